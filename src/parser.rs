//! The sluice statement parser: DataFusion's `DFParser` with sluice's statements on top.
//!
//! We peek at the first words for our own statements (`CREATE CONNECTION`, `DROP CONNECTION`,
//! `SHOW CONNECTIONS`) and hand everything else to DataFusion, so all of its SQL keeps working.

use datafusion::error::DataFusionError;
use datafusion::sql::parser::{DFParser, DFParserBuilder, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::Ident;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Location, Token, Tokenizer};

use crate::error::{Error, Result};
use crate::options::OptionValue;

/// A statement sluice understands.
#[derive(Debug, Clone)]
pub enum Statement {
    /// `CREATE [OR REPLACE] CONNECTION [IF NOT EXISTS] name TYPE kind [OPTIONS (key value, ...)]`
    CreateConnection(CreateConnection),
    /// `DROP CONNECTION [IF EXISTS] name`
    DropConnection { name: String, if_exists: bool },
    /// `SHOW CONNECTIONS`
    ShowConnections,
    /// `SHOW CONNECTION TYPES`
    ShowConnectionTypes,
    /// `DESCRIBE CONNECTION TYPE kind`: the options a kind takes.
    DescribeConnectionType { kind: String },
    /// `SHOW OBJECTS IN connection` (or `FROM`): its objects, keys and modes.
    ShowObjects { connection: String },
    /// `CREATE [OR REPLACE] SYNC [IF NOT EXISTS] name [SCHEDULE EVERY '…' | CRON '…']
    /// [OPTIONS (…)] AS <INSERT | MERGE | DELETE>`
    CreateSync(CreateSync),
    /// `RUN SYNC name [SAMPLE n | SAMPLE WHERE key IN (value, …)]`
    RunSync {
        name: String,
        sample: Option<crate::contract::Sample>,
    },
    /// `EXPLAIN SYNC name`: a dry run.
    ExplainSync { name: String },
    /// `RESET SYNC name`
    ResetSync { name: String },
    /// `DROP SYNC [IF EXISTS] name`
    DropSync { name: String, if_exists: bool },
    /// `SHOW SYNCS`
    ShowSyncs,
    /// `CREATE [OR REPLACE] ALERT [IF NOT EXISTS] name ON SYNC pattern WHEN predicate NOTIFY
    /// connection [OPTIONS (…)]`
    CreateAlert(CreateAlert),
    /// `DROP ALERT [IF EXISTS] name`
    DropAlert { name: String, if_exists: bool },
    /// `SHOW ALERTS`
    ShowAlerts,
    /// Anything DataFusion parses.
    Sql(Box<DFStatement>),
}

/// `CREATE CONNECTION`.
#[derive(Debug, Clone)]
pub struct CreateConnection {
    pub name: String,
    pub kind: String,
    pub or_replace: bool,
    pub if_not_exists: bool,
    pub options: Vec<(String, OptionValue)>,
}

/// When a named sync should run (`sluice serve` runs it; see [`crate::schedule`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// `SCHEDULE EVERY '15 minutes'`
    Every(String),
    /// `SCHEDULE CRON '0 * * * *' [TIMEZONE 'Europe/Paris']` (5 fields, or 6 with seconds
    /// first; UTC unless a timezone is given)
    Cron {
        expression: String,
        timezone: Option<String>,
    },
    /// `SCHEDULE AFTER a [, b …]`: a sequence; runs when the named syncs have succeeded.
    After(Vec<String>),
    /// `SCHEDULE AFTER DBT 'path/to/target'`: runs after dbt's successful runs there.
    AfterDbt(String),
    /// `SCHEDULE ON CHANGE [EVERY '10 seconds']`: runs when the model's inputs change.
    OnChange { every: Option<String> },
    /// `SCHEDULE ON NOTIFY 'channel'`: runs on a Postgres NOTIFY on that channel.
    OnNotify(String),
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let quoted = |s: &str| format!("'{}'", s.replace('\'', "''"));
        match self {
            Schedule::Every(e) => write!(f, "EVERY {}", quoted(e)),
            Schedule::Cron {
                expression,
                timezone,
            } => {
                write!(f, "CRON {}", quoted(expression))?;
                match timezone {
                    Some(tz) => write!(f, " TIMEZONE {}", quoted(tz)),
                    None => Ok(()),
                }
            }
            Schedule::After(names) => write!(f, "AFTER {}", names.join(", ")),
            Schedule::AfterDbt(path) => write!(f, "AFTER DBT {}", quoted(path)),
            Schedule::OnChange { every: None } => write!(f, "ON CHANGE"),
            Schedule::OnChange { every: Some(e) } => write!(f, "ON CHANGE EVERY {}", quoted(e)),
            Schedule::OnNotify(channel) => write!(f, "ON NOTIFY {}", quoted(channel)),
        }
    }
}

/// `CREATE ALERT`.
#[derive(Debug, Clone)]
pub struct CreateAlert {
    pub name: String,
    pub or_replace: bool,
    pub if_not_exists: bool,
    /// The syncs it watches: a name, or a pattern with `*` and `?` (`'accounts_*'`, `'*'`).
    pub pattern: String,
    /// A predicate over the columns of the run's `sluice.runs` row, as written.
    pub predicate: String,
    /// The connection notified (a webhook or slack connection).
    pub notify: String,
    pub options: Vec<(String, OptionValue)>,
}

/// `CREATE SYNC`.
#[derive(Debug, Clone)]
pub struct CreateSync {
    pub name: String,
    pub or_replace: bool,
    pub if_not_exists: bool,
    pub schedule: Option<Schedule>,
    pub options: Vec<(String, OptionValue)>,
    /// The INSERT, MERGE or DELETE the sync runs.
    pub body: Box<DFStatement>,
    /// The body's text, as written.
    pub body_text: String,
}

/// A parsed statement with where it sits in the source text.
#[derive(Debug, Clone)]
pub struct ParsedStatement {
    pub statement: Statement,
    /// 1-based line of the statement's first token.
    pub line: u64,
    /// 1-based column of the statement's first token.
    pub column: u64,
    /// The statement's own text, without the trailing `;`.
    pub text: String,
}

/// Parses every statement; the first syntax error stops parsing.
pub fn parse_sql(sql: &str) -> Result<Vec<ParsedStatement>> {
    let (statements, mut errors) = parse_sql_recovering(sql);
    if errors.is_empty() {
        Ok(statements)
    } else {
        Err(errors.remove(0))
    }
}

/// Parses every statement; after a syntax error skips to the next `;` and carries on, so that
/// `sluice check` reports every problem in a file.
pub fn parse_sql_recovering(sql: &str) -> (Vec<ParsedStatement>, Vec<Error>) {
    let dialect = GenericDialect {};
    let mut parser = match DFParserBuilder::new(sql).with_dialect(&dialect).build() {
        Ok(p) => SluiceParser { df: p },
        Err(e) => return (vec![], vec![parse_error(e)]),
    };
    let mut statements = vec![];
    let mut errors = vec![];
    loop {
        while parser.df.parser.consume_token(&Token::SemiColon) {}
        let start = parser.df.parser.peek_token();
        if start.token == Token::EOF {
            break;
        }
        match parser.parse_statement() {
            Ok(statement) => {
                let next = parser.df.parser.peek_token();
                if !matches!(next.token, Token::SemiColon | Token::EOF) {
                    errors.push(located(
                        format!("expected ';' after the statement, found {}", next.token),
                        next.span.start,
                    ));
                    parser.skip_statement();
                    continue;
                }
                statements.push(ParsedStatement {
                    statement,
                    line: start.span.start.line,
                    column: start.span.start.column,
                    text: slice(sql, start.span.start, next.span.start)
                        .trim()
                        .to_string(),
                });
            }
            Err(mut e) => {
                if let Error::Parse { line, column, .. } = &mut e
                    && *line == 0
                {
                    (*line, *column) = (start.span.start.line, start.span.start.column);
                }
                errors.push(e);
                parser.skip_statement();
            }
        }
    }
    (statements, errors)
}

fn located(message: String, at: Location) -> Error {
    Error::Parse {
        message,
        line: at.line,
        column: at.column,
    }
}

fn parse_error(e: DataFusionError) -> Error {
    match e {
        DataFusionError::SQL(p, _) => Error::from(*p),
        other => {
            let (message, location) = crate::error::split_location(&other.to_string());
            let (line, column) = location.unwrap_or((0, 0));
            Error::Parse {
                message: message.trim_start_matches("SQL error: ").to_string(),
                line,
                column,
            }
        }
    }
}

struct SluiceParser<'a> {
    df: DFParser<'a>,
}

impl SluiceParser<'_> {
    fn word(&self, n: usize, w: &str) -> bool {
        matches!(&self.df.parser.peek_nth_token(n).token, Token::Word(word) if word.quote_style.is_none() && word.value.eq_ignore_ascii_case(w))
    }

    /// Consumes `words` if the statement starts with them.
    fn words(&mut self, words: &[&str]) -> bool {
        if !words.iter().enumerate().all(|(n, w)| self.word(n, w)) {
            return false;
        }
        for _ in words {
            self.df.parser.next_token();
        }
        true
    }

    /// `[IF EXISTS] name` after `DROP <thing>`.
    fn parse_drop_target(&mut self) -> Result<(String, bool)> {
        let if_exists = self
            .df
            .parser
            .parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
        let name = normalize(self.df.parser.parse_identifier()?);
        Ok((name, if_exists))
    }

    fn skip_statement(&mut self) {
        loop {
            let t = self.df.parser.next_token();
            if matches!(t.token, Token::SemiColon | Token::EOF) {
                break;
            }
        }
    }

    fn parse_statement(&mut self) -> Result<Statement> {
        if self.word(0, "CREATE") {
            let mut n = 1;
            let or_replace = self.word(1, "OR") && self.word(2, "REPLACE");
            if or_replace {
                n = 3;
            }
            if self.word(n, "CONNECTION") {
                for _ in 0..=n {
                    self.df.parser.next_token();
                }
                return self.parse_create_connection(or_replace);
            }
            if self.word(n, "SYNC") {
                for _ in 0..=n {
                    self.df.parser.next_token();
                }
                return self.parse_create_sync(or_replace);
            }
            if self.word(n, "ALERT") {
                for _ in 0..=n {
                    self.df.parser.next_token();
                }
                return self.parse_create_alert(or_replace);
            }
        }
        if self.words(&["RUN", "SYNC"]) {
            let name = normalize(self.df.parser.parse_identifier()?);
            let sample = match self.words(&["SAMPLE"]) {
                true => Some(self.parse_sample(&name)?),
                false => None,
            };
            return Ok(Statement::RunSync { name, sample });
        }
        for (first, make) in [
            (
                "EXPLAIN",
                (|name| Statement::ExplainSync { name }) as fn(String) -> Statement,
            ),
            ("RESET", |name| Statement::ResetSync { name }),
        ] {
            if self.words(&[first, "SYNC"]) {
                let name = normalize(self.df.parser.parse_identifier()?);
                return Ok(make(name));
            }
        }
        if self.words(&["DROP", "SYNC"]) {
            let (name, if_exists) = self.parse_drop_target()?;
            return Ok(Statement::DropSync { name, if_exists });
        }
        if self.words(&["SHOW", "SYNCS"]) {
            return Ok(Statement::ShowSyncs);
        }
        if self.words(&["DROP", "ALERT"]) {
            let (name, if_exists) = self.parse_drop_target()?;
            return Ok(Statement::DropAlert { name, if_exists });
        }
        if self.words(&["SHOW", "ALERTS"]) {
            return Ok(Statement::ShowAlerts);
        }
        if self.words(&["DROP", "CONNECTION"]) {
            let (name, if_exists) = self.parse_drop_target()?;
            return Ok(Statement::DropConnection { name, if_exists });
        }
        if self.words(&["SHOW", "CONNECTIONS"]) {
            return Ok(Statement::ShowConnections);
        }
        if self.words(&["SHOW", "CONNECTION", "TYPES"]) {
            return Ok(Statement::ShowConnectionTypes);
        }
        if self.words(&["DESCRIBE", "CONNECTION", "TYPE"]) {
            let kind = self.df.parser.parse_identifier()?.value.to_lowercase();
            return Ok(Statement::DescribeConnectionType { kind });
        }
        if self.words(&["SHOW", "OBJECTS", "IN"]) || self.words(&["SHOW", "OBJECTS", "FROM"]) {
            let connection = normalize(self.df.parser.parse_identifier()?);
            return Ok(Statement::ShowObjects { connection });
        }
        let statement = self.df.parse_statement().map_err(parse_error)?;
        Ok(Statement::Sql(Box::new(statement)))
    }

    /// `n` or `WHERE key IN (value, …)` after `RUN SYNC name SAMPLE`.
    fn parse_sample(&mut self, name: &str) -> Result<crate::contract::Sample> {
        use crate::contract::Sample;
        let usage = format!(
            "write RUN SYNC {name} SAMPLE <number of records>, or RUN SYNC {name} SAMPLE WHERE <key> IN (<value>, …)"
        );
        let found = self.df.parser.peek_token();
        if let Token::Number(n, _) = &found.token {
            let n: usize = n
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| located(format!("SAMPLE {n}: {usage}"), found.span.start))?;
            self.df.parser.next_token();
            return Ok(Sample::First(n));
        }
        if !self.df.parser.parse_keyword(Keyword::WHERE) {
            return Err(located(
                format!(
                    "expected a number or WHERE after SAMPLE, found {}; {usage}",
                    found.token
                ),
                found.span.start,
            ));
        }
        let field = normalize(self.df.parser.parse_identifier()?);
        if !self.df.parser.parse_keyword(Keyword::IN) {
            let found = self.df.parser.peek_token();
            return Err(located(
                format!(
                    "expected IN after SAMPLE WHERE {field}, found {}; {usage}",
                    found.token
                ),
                found.span.start,
            ));
        }
        self.df.parser.expect_token(&Token::LParen)?;
        let mut keys = vec![];
        loop {
            let token = self.df.parser.next_token();
            match &token.token {
                Token::Number(v, _) => keys.push(v.clone()),
                Token::SingleQuotedString(v) => keys.push(v.clone()),
                other => {
                    return Err(located(
                        format!(
                            "SAMPLE WHERE {field} IN takes literal keys, found {other}; {usage}"
                        ),
                        token.span.start,
                    ));
                }
            }
            if !self.df.parser.consume_token(&Token::Comma) {
                break;
            }
        }
        self.df.parser.expect_token(&Token::RParen)?;
        Ok(Sample::Keys { field, keys })
    }

    fn parse_create_connection(&mut self, or_replace: bool) -> Result<Statement> {
        let if_not_exists =
            self.df
                .parser
                .parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
        let name = normalize(self.df.parser.parse_identifier()?);
        if !self.df.parser.parse_keyword(Keyword::TYPE) {
            let found = self.df.parser.peek_token();
            return Err(located(
                format!(
                    "expected TYPE after CREATE CONNECTION {name}, found {}; write CREATE CONNECTION {name} TYPE <kind> OPTIONS (...)",
                    found.token
                ),
                found.span.start,
            ));
        }
        let kind = self.df.parser.parse_identifier()?.value.to_lowercase();
        let options = if self.df.parser.parse_keyword(Keyword::OPTIONS) {
            self.parse_options()?
        } else {
            vec![]
        };
        Ok(Statement::CreateConnection(CreateConnection {
            name,
            kind,
            or_replace,
            if_not_exists,
            options,
        }))
    }

    fn parse_create_sync(&mut self, or_replace: bool) -> Result<Statement> {
        let if_not_exists =
            self.df
                .parser
                .parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
        let name = normalize(self.df.parser.parse_identifier()?);
        let schedule = if self.word(0, "SCHEDULE") {
            self.df.parser.next_token();
            Some(self.parse_schedule()?)
        } else {
            None
        };
        let options = if self.df.parser.parse_keyword(Keyword::OPTIONS) {
            self.parse_options()?
        } else {
            vec![]
        };
        if !self.df.parser.parse_keyword(Keyword::AS) {
            let found = self.df.parser.peek_token();
            return Err(located(
                format!(
                    "expected AS <INSERT | MERGE | DELETE> after CREATE SYNC {name}, found {}",
                    found.token
                ),
                found.span.start,
            ));
        }
        let start = self.df.parser.peek_token();
        if !(self.word(0, "INSERT") || self.word(0, "MERGE") || self.word(0, "DELETE")) {
            return Err(located(
                format!(
                    "a sync runs an INSERT, MERGE or DELETE into a destination; found {}",
                    start.token
                ),
                start.span.start,
            ));
        }
        let body = self.df.parse_statement().map_err(parse_error)?;
        let body_text = body.to_string();
        Ok(Statement::CreateSync(CreateSync {
            name,
            or_replace,
            if_not_exists,
            schedule,
            options,
            body: Box::new(body),
            body_text,
        }))
    }

    fn parse_create_alert(&mut self, or_replace: bool) -> Result<Statement> {
        let if_not_exists =
            self.df
                .parser
                .parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
        let name = normalize(self.df.parser.parse_identifier()?);
        let usage = format!(
            "write CREATE ALERT {name} ON SYNC <name or 'pattern*'> WHEN <condition on sluice.runs columns> NOTIFY <connection>"
        );
        let expect = |parser: &mut Self, words: &[&str]| -> Result<()> {
            if parser.words(words) {
                return Ok(());
            }
            let found = parser.df.parser.peek_token();
            Err(located(
                format!(
                    "expected {} ({usage}), found {}",
                    words.join(" "),
                    found.token
                ),
                found.span.start,
            ))
        };
        expect(self, &["ON", "SYNC"])?;
        let pattern = match self.df.parser.peek_token().token {
            Token::SingleQuotedString(_) => self.df.parser.parse_literal_string()?,
            Token::Mul => {
                self.df.parser.next_token();
                "*".to_string()
            }
            _ => normalize(self.df.parser.parse_identifier()?),
        };
        expect(self, &["WHEN"])?;
        let predicate = self.df.parser.parse_expr()?;
        expect(self, &["NOTIFY"])?;
        let notify = normalize(self.df.parser.parse_identifier()?);
        let options = if self.df.parser.parse_keyword(Keyword::OPTIONS) {
            self.parse_options()?
        } else {
            vec![]
        };
        Ok(Statement::CreateAlert(CreateAlert {
            name,
            or_replace,
            if_not_exists,
            pattern,
            predicate: predicate.to_string(),
            notify,
            options,
        }))
    }

    /// What follows `SCHEDULE`: `EVERY '…'`, `CRON '…' [TIMEZONE '…']`, `AFTER a [, b …]`,
    /// `AFTER DBT '…'`, `ON CHANGE [EVERY '…']` or `ON NOTIFY '…'`.
    fn parse_schedule(&mut self) -> Result<Schedule> {
        let every = |value: String, at| -> Result<String> {
            crate::options::parse_duration(&value).map_err(|e| {
                located(
                    format!(
                        "SCHEDULE EVERY '{value}' is not a duration ({e}); e.g. EVERY '15 minutes'"
                    ),
                    at,
                )
            })?;
            Ok(value)
        };
        let kind = self.df.parser.peek_token();
        let at = kind.span.start;
        if self.words(&["EVERY"]) {
            let value = self.df.parser.parse_literal_string()?;
            return Ok(Schedule::Every(every(value, at)?));
        }
        if self.words(&["CRON"]) {
            let expression = self.df.parser.parse_literal_string()?;
            if !(5..=6).contains(&expression.split_whitespace().count()) {
                return Err(located(
                    format!(
                        "SCHEDULE CRON '{expression}' needs 5 fields (minute hour day month weekday), or 6 with seconds first, e.g. CRON '0 * * * *'"
                    ),
                    at,
                ));
            }
            let timezone = if self.words(&["TIMEZONE"]) {
                Some(self.df.parser.parse_literal_string()?)
            } else {
                None
            };
            return Ok(Schedule::Cron {
                expression,
                timezone,
            });
        }
        if self.words(&["ON", "CHANGE"]) {
            let every = if self.word(0, "EVERY") {
                let at = self.df.parser.next_token().span.start;
                let value = self.df.parser.parse_literal_string()?;
                Some(every(value, at)?)
            } else {
                None
            };
            return Ok(Schedule::OnChange { every });
        }
        if self.words(&["ON", "NOTIFY"]) {
            let channel = self.df.parser.parse_literal_string()?;
            return Ok(Schedule::OnNotify(channel));
        }
        if self.words(&["AFTER"]) {
            if self.word(0, "DBT")
                && matches!(
                    self.df.parser.peek_nth_token(1).token,
                    Token::SingleQuotedString(_)
                )
            {
                self.df.parser.next_token();
                return Ok(Schedule::AfterDbt(self.df.parser.parse_literal_string()?));
            }
            let mut names = vec![normalize(self.df.parser.parse_identifier()?)];
            while self.df.parser.consume_token(&Token::Comma) {
                names.push(normalize(self.df.parser.parse_identifier()?));
            }
            return Ok(Schedule::After(names));
        }
        Err(located(
            format!(
                "expected EVERY '…', CRON '…', AFTER sync, AFTER DBT '…', ON CHANGE or ON NOTIFY '…' after SCHEDULE, found {}",
                kind.token
            ),
            at,
        ))
    }

    /// `( key value [, key value ...] )` where a value is a literal, `env('VAR')` or `file('path')`,
    /// and `key = value` is accepted too.
    fn parse_options(&mut self) -> Result<Vec<(String, OptionValue)>> {
        self.df.parser.expect_token(&Token::LParen)?;
        let mut options = vec![];
        if self.df.parser.consume_token(&Token::RParen) {
            return Ok(options);
        }
        loop {
            let key = self
                .df
                .parse_option_key()
                .map_err(parse_error)?
                .to_lowercase();
            let _ = self.df.parser.consume_token(&Token::Eq);
            let value = self.parse_option_value()?;
            options.push((key, value));
            if self.df.parser.consume_token(&Token::RParen) {
                break;
            }
            if !self.df.parser.consume_token(&Token::Comma) {
                let found = self.df.parser.peek_token();
                return Err(located(
                    format!(
                        "expected ',' or ')' in OPTIONS, found {}; options are written as (key 'value', key env('VAR'))",
                        found.token
                    ),
                    found.span.start,
                ));
            }
        }
        Ok(options)
    }

    fn parse_option_value(&mut self) -> Result<OptionValue> {
        for (function, make) in [
            ("env", OptionValue::Env as fn(String) -> OptionValue),
            ("file", OptionValue::File),
        ] {
            if self.word(0, function) && self.df.parser.peek_nth_token(1).token == Token::LParen {
                self.df.parser.next_token();
                self.df.parser.next_token();
                let arg = self.df.parser.parse_literal_string()?;
                self.df.parser.expect_token(&Token::RParen)?;
                return Ok(make(arg));
            }
        }
        let value = self.df.parse_option_value().map_err(parse_error)?;
        use datafusion::sql::sqlparser::ast::Value;
        Ok(OptionValue::Literal(match value {
            Value::SingleQuotedString(s)
            | Value::DoubleQuotedString(s)
            | Value::EscapedStringLiteral(s) => s,
            Value::Number(n, _) => n,
            other => other.to_string(),
        }))
    }
}

/// Unquoted identifiers are lowercased, as DataFusion does; quoted ones keep their case.
pub fn normalize(ident: Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value
    } else {
        ident.value.to_lowercase()
    }
}

/// The text between two token locations.
fn slice(sql: &str, from: Location, to: Location) -> &str {
    let start = offset(sql, from).unwrap_or(0);
    let end = if to.line == 0 {
        sql.len()
    } else {
        offset(sql, to).unwrap_or(sql.len())
    };
    &sql[start..end.max(start)]
}

/// Byte offset of a 1-based (line, column-in-chars) location.
fn offset(sql: &str, at: Location) -> Option<usize> {
    let mut line = 1;
    let mut column = 1;
    for (i, ch) in sql.char_indices() {
        if line == at.line && column == at.column {
            return Some(i);
        }
        if ch == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line == at.line && column == at.column).then_some(sql.len())
}

/// Where `token` (an identifier or string the user wrote) first appears in `text`, as a 1-based
/// (line, column) relative to the text. Used to point errors at the token they are about.
pub fn locate_token(text: &str, token: &str) -> Option<(u64, u64)> {
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, text)
        .tokenize_with_location()
        .ok()?;
    let wanted = token.trim_matches('"');
    tokens.iter().find_map(|t| {
        let matches = match &t.token {
            Token::Word(w) => {
                if w.quote_style.is_some() {
                    w.value == wanted
                } else {
                    w.value.eq_ignore_ascii_case(wanted)
                }
            }
            Token::SingleQuotedString(s) => s == wanted,
            _ => false,
        };
        matches.then_some((t.span.start.line, t.span.start.column))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connections_and_passes_the_rest_to_datafusion() {
        let sql = "CREATE CONNECTION Out TYPE file OPTIONS (url 'out/', format = jsonl, token env('T'), key file('k.txt'));\n\
                   SELECT 1;\nSHOW CONNECTIONS; DROP CONNECTION IF EXISTS out";
        let parsed = parse_sql(sql).unwrap();
        assert_eq!(parsed.len(), 4);
        let Statement::CreateConnection(c) = &parsed[0].statement else {
            panic!("{:?}", parsed[0])
        };
        assert_eq!(c.name, "out");
        assert_eq!(c.kind, "file");
        assert_eq!(
            c.options,
            vec![
                ("url".into(), OptionValue::Literal("out/".into())),
                ("format".into(), OptionValue::Literal("jsonl".into())),
                ("token".into(), OptionValue::Env("T".into())),
                ("key".into(), OptionValue::File("k.txt".into())),
            ]
        );
        assert!(matches!(parsed[1].statement, Statement::Sql(_)));
        assert_eq!((parsed[1].line, parsed[1].column), (2, 1));
        assert_eq!(parsed[1].text, "SELECT 1");
        assert!(matches!(parsed[2].statement, Statement::ShowConnections));
        assert!(matches!(
            &parsed[3].statement,
            Statement::DropConnection { name, if_exists: true } if name == "out"
        ));
    }

    #[test]
    fn run_sync_takes_a_sample_by_count_or_by_key() {
        use crate::contract::Sample;
        let parsed = parse_sql(
            "RUN SYNC s; RUN SYNC S SAMPLE 5; run sync s sample where Email in ('a@x.io', 7)",
        )
        .unwrap();
        let samples: Vec<_> = parsed
            .iter()
            .map(|p| match &p.statement {
                Statement::RunSync { name, sample } => (name.clone(), sample.clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            samples,
            [
                ("s".to_string(), None),
                ("s".to_string(), Some(Sample::First(5))),
                (
                    "s".to_string(),
                    Some(Sample::Keys {
                        field: "email".into(),
                        keys: vec!["a@x.io".into(), "7".into()]
                    })
                ),
            ]
        );
        assert_eq!(
            samples[2].1.as_ref().unwrap().to_string(),
            "SAMPLE WHERE email IN ('a@x.io', '7')"
        );
        for (sql, says) in [
            (
                "RUN SYNC s SAMPLE 0",
                "SAMPLE 0: write RUN SYNC s SAMPLE <number of records>",
            ),
            (
                "RUN SYNC s SAMPLE all",
                "expected a number or WHERE after SAMPLE",
            ),
            (
                "RUN SYNC s SAMPLE WHERE id = 1",
                "expected IN after SAMPLE WHERE id",
            ),
            (
                "RUN SYNC s SAMPLE WHERE id IN (other.id)",
                "takes literal keys",
            ),
        ] {
            let err = parse_sql(sql).unwrap_err().to_string();
            assert!(err.contains(says), "{sql}: {err}");
        }
    }

    #[test]
    fn recovers_after_errors_and_reports_locations() {
        let sql = "SELECT 1;\nSELEC 2;\nCREATE CONNECTION x file;\nSELECT 3";
        let (ok, errors) = parse_sql_recovering(sql);
        assert_eq!(ok.len(), 2);
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].location(), Some((2, 1)), "{:?}", errors[0]);
        assert_eq!(errors[1].location(), Some((3, 21)), "{:?}", errors[1]);
        assert!(errors[1].to_string().contains("expected TYPE"));
    }

    #[test]
    fn locates_tokens() {
        assert_eq!(
            locate_token("INSERT INTO out.contacts\nSELECT emial FROM t", "emial"),
            Some((2, 8))
        );
        assert_eq!(locate_token("SELECT 1", "nope"), None);
    }
}
