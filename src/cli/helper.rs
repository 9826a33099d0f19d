//! The REPL's rustyline helper: multi-line input ended by `;` and tab completion of keywords,
//! connections, tables, objects and columns.

use std::sync::{Arc, RwLock};

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::ALL_KEYWORDS;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use rustyline::completion::{Completer, Pair};
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Context, Helper, Highlighter, Hinter};

/// Words sluice adds to SQL's keywords.
const SLUICE_WORDS: &[&str] = &[
    "CONNECTION",
    "CONNECTIONS",
    "SYNC",
    "SYNCS",
    "SCHEDULE",
    "EVERY",
    "CRON",
    "TYPE",
    "OPTIONS",
    "env",
    "file",
];

/// The REPL helper; `words` is refreshed by the REPL after every statement.
#[derive(Helper, Hinter, Highlighter)]
pub struct SluiceHelper {
    words: Arc<RwLock<Vec<String>>>,
}

impl SluiceHelper {
    pub fn new(words: Arc<RwLock<Vec<String>>>) -> Self {
        Self { words }
    }

    /// Completion candidates for the word `prefix`.
    pub fn candidates(&self, prefix: &str) -> Vec<String> {
        let lower = prefix.to_lowercase();
        let lowercase_keywords = prefix.chars().next().is_some_and(char::is_lowercase);
        let mut out: Vec<String> = self
            .words
            .read()
            .expect("completion lock")
            .iter()
            .filter(|w| w.to_lowercase().starts_with(&lower))
            .cloned()
            .collect();
        if !prefix.contains('.') {
            out.extend(
                ALL_KEYWORDS
                    .iter()
                    .chain(SLUICE_WORDS)
                    .filter(|k| k.to_lowercase().starts_with(&lower))
                    .map(|k| {
                        if lowercase_keywords {
                            k.to_lowercase()
                        } else {
                            k.to_string()
                        }
                    }),
            );
        }
        out.sort();
        out.dedup();
        out
    }
}

impl Completer for SluiceHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let start = line[..pos]
            .char_indices()
            .rev()
            .find(|(_, c)| !(c.is_alphanumeric() || matches!(c, '_' | '.')))
            .map(|(i, c)| i + c.len_utf8())
            .unwrap_or(0);
        let prefix = &line[start..pos];
        if prefix.is_empty() {
            return Ok((pos, vec![]));
        }
        let pairs = self
            .candidates(prefix)
            .into_iter()
            .map(|w| Pair {
                display: w.clone(),
                replacement: w,
            })
            .collect();
        Ok((start, pairs))
    }
}

impl Validator for SluiceHelper {
    fn validate(&self, ctx: &mut ValidationContext<'_>) -> rustyline::Result<ValidationResult> {
        Ok(if is_complete(ctx.input()) {
            ValidationResult::Valid(None)
        } else {
            ValidationResult::Incomplete
        })
    }
}

/// Input is complete when it is a backslash command, or SQL whose last token is `;` (a `;`
/// inside a string or comment does not count).
pub fn is_complete(input: &str) -> bool {
    let trimmed = input.trim();
    if trimmed.is_empty() || trimmed.starts_with('\\') {
        return true;
    }
    let dialect = GenericDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, trimmed).tokenize() else {
        return false; // e.g. an unterminated string: keep reading
    };
    // Comments are whitespace tokens, so `SELECT 1; -- done` ends with `;`.
    tokens
        .iter()
        .rev()
        .find(|t| !matches!(t, Token::Whitespace(_)))
        .is_some_and(|t| *t == Token::SemiColon)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_end_at_a_semicolon_outside_strings() {
        assert!(is_complete("SELECT 1;"));
        assert!(is_complete("SELECT 1; -- done"));
        assert!(!is_complete("SELECT 1"));
        assert!(!is_complete("SELECT ';"));
        assert!(!is_complete("SELECT 1 -- ;"));
        assert!(is_complete("\\d"));
    }

    #[test]
    fn completes_keywords_and_known_words() {
        let words = Arc::new(RwLock::new(vec![
            "out".to_string(),
            "out.contacts".to_string(),
            "email".to_string(),
        ]));
        let helper = SluiceHelper::new(words);
        assert!(helper.candidates("SEL").contains(&"SELECT".to_string()));
        assert!(helper.candidates("sel").contains(&"select".to_string()));
        assert_eq!(helper.candidates("out.c"), vec!["out.contacts".to_string()]);
        assert!(helper.candidates("ema").contains(&"email".to_string()));
        assert!(
            helper
                .candidates("CONNECTI")
                .contains(&"CONNECTION".to_string())
        );
    }
}
