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
    /// The option keys of each connection type, and of `CREATE SYNC` (under `sync`).
    options: Vec<(String, Vec<String>)>,
}

impl SluiceHelper {
    pub fn new(words: Arc<RwLock<Vec<String>>>, options: Vec<(String, Vec<String>)>) -> Self {
        Self { words, options }
    }

    /// The option keys that may be typed at the end of `before` (a word after `OPTIONS (` or a
    /// comma inside it), or `None` when the cursor is not at an option key. Keys are those of
    /// the statement's connection type (`CREATE CONNECTION … TYPE kind`), or a sync's.
    fn option_keys(&self, before: &str) -> Option<&[String]> {
        let dialect = GenericDialect {};
        let tokens = Tokenizer::new(&dialect, before).tokenize().ok()?;
        let tokens: Vec<&Token> = tokens
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .collect();
        let statement = tokens
            .iter()
            .rposition(|t| **t == Token::SemiColon)
            .map_or(0, |i| i + 1);
        let tokens = &tokens[statement..];
        if !matches!(tokens.last(), Some(Token::LParen | Token::Comma)) {
            return None;
        }
        let is = |t: &Token, w: &str| matches!(t, Token::Word(word) if word.value.eq_ignore_ascii_case(w));
        let open = tokens
            .windows(2)
            .rposition(|w| is(w[0], "OPTIONS") && *w[1] == Token::LParen)?;
        if tokens[open..].iter().any(|t| **t == Token::RParen) {
            return None;
        }
        let kind = if tokens.len() > 1 && is(tokens[1], "SYNC")
            || tokens.len() > 3 && is(tokens[3], "SYNC")
        {
            "sync".to_string()
        } else {
            let at = tokens[..open].iter().rposition(|t| is(t, "TYPE"))?;
            match tokens.get(at + 1) {
                Some(Token::Word(w)) => w.value.to_lowercase(),
                _ => return None,
            }
        };
        self.options
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, keys)| keys.as_slice())
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
        if let Some(keys) = self.option_keys(&line[..start]) {
            let lower = prefix.to_lowercase();
            let pairs = keys
                .iter()
                .filter(|k| k.starts_with(&lower))
                .map(|k| Pair {
                    display: k.clone(),
                    replacement: k.clone(),
                })
                .collect();
            return Ok((start, pairs));
        }
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
        let helper = SluiceHelper::new(words, vec![]);
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

    #[test]
    fn completes_the_option_keys_of_the_type_being_created() {
        let helper = SluiceHelper::new(
            Arc::default(),
            vec![
                (
                    "webhook".into(),
                    vec!["url".into(), "key".into(), "max_bytes".into()],
                ),
                ("sync".into(), vec!["max_deletes".into(), "diff".into()]),
            ],
        );
        let keys = |before: &str| helper.option_keys(before).map(|k| k.to_vec());
        let webhook = Some(vec!["url".to_string(), "key".into(), "max_bytes".into()]);
        assert_eq!(keys("CREATE CONNECTION h TYPE webhook OPTIONS ("), webhook);
        assert_eq!(
            keys("create connection h type webhook options (url 'x', "),
            webhook
        );
        assert_eq!(
            keys("CREATE OR REPLACE SYNC s OPTIONS ("),
            Some(vec!["max_deletes".to_string(), "diff".into()])
        );
        // After a key (its value comes next), after the list, in another statement or type.
        assert_eq!(keys("CREATE CONNECTION h TYPE webhook OPTIONS (url "), None);
        assert_eq!(
            keys("CREATE CONNECTION h TYPE webhook OPTIONS (url 'x') "),
            None
        );
        assert_eq!(
            keys("CREATE CONNECTION h TYPE webhook OPTIONS (url 'x'); SELECT ("),
            None
        );
        assert_eq!(keys("CREATE CONNECTION h TYPE nope OPTIONS ("), None);
        let line = "CREATE CONNECTION h TYPE webhook OPTIONS (url 'x', ma";
        let (start, pairs) = helper
            .complete(
                line,
                line.len(),
                &Context::new(&rustyline::history::DefaultHistory::new()),
            )
            .unwrap();
        assert_eq!(start, line.len() - 2);
        let shown: Vec<_> = pairs.iter().map(|p| p.replacement.as_str()).collect();
        assert_eq!(shown, ["max_bytes"]);
    }
}
