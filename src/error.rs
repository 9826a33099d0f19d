//! The error type of the engine: what went wrong, the identifier it concerns, and what to do next.

use datafusion::error::DataFusionError;

/// What a destination's failure is about, beyond its message: kept in `sluice.runs` and the run
/// record so that alerts and logs can act on it (retry later on a 429, page on a 401, …).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    /// The connection written to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
    /// The destination object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// The HTTP status of the answer that ended the write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The destination's own error code (HubSpot's `category`, Salesforce's `errorCode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The key of the one record at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Result alias used across sluice.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop a statement.
///
/// Each variant carries the identifier it is about (a connection, an option, a column) so that the
/// front ends can point at the token in the statement, and its message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The SQL text does not parse.
    #[error("{message}")]
    Parse {
        message: String,
        /// 1-based line of the offending token, when the parser knows it.
        line: u64,
        /// 1-based column of the offending token, when the parser knows it.
        column: u64,
    },

    /// A `CREATE CONNECTION ... TYPE x` names a kind sluice does not have.
    #[error("unknown connection type '{kind}'; valid types: {valid}")]
    UnknownKind { kind: String, valid: String },

    /// A connection with this name already exists.
    #[error(
        "connection '{name}' already exists; use CREATE OR REPLACE CONNECTION to redefine it, or DROP CONNECTION {name} first"
    )]
    ConnectionExists { name: String },

    /// A statement names a connection that was never created.
    #[error("unknown connection '{name}'{hint}")]
    UnknownConnection { name: String, hint: String },

    /// A problem with a connection option (unknown key, missing value, bad value, unset variable).
    #[error("{message}")]
    Option {
        /// The option key the problem is about.
        key: String,
        message: String,
    },

    /// A statement is well-formed SQL but cannot be planned as written.
    #[error("{message}")]
    Plan {
        message: String,
        /// The identifier in the statement the problem is about, if any.
        token: Option<String>,
    },

    /// Writing to a destination failed.
    #[error("{message}")]
    Write { message: String },

    /// A destination refused or failed a write, with the facts its answer gave.
    #[error("{message}")]
    Destination {
        message: String,
        facts: Box<Failure>,
    },

    /// Sync state cannot be read, written or locked.
    #[error("{message}")]
    State { message: String },

    /// The statement was cancelled (Ctrl-C).
    #[error("statement cancelled")]
    Cancelled,

    /// An error raised inside DataFusion (planning or execution).
    #[error("{}", describe_datafusion(.0))]
    DataFusion(#[from] DataFusionError),

    /// A local file could not be read.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A planning error about `token` (an identifier the user wrote).
    pub fn plan(message: impl Into<String>, token: impl Into<String>) -> Self {
        Error::Plan {
            message: message.into(),
            token: Some(token.into()),
        }
    }

    /// A destination's failure with its facts.
    pub fn destination(message: impl Into<String>, facts: Failure) -> Self {
        Error::Destination {
            message: message.into(),
            facts: Box::new(facts),
        }
    }

    /// The facts of a destination's failure, wherever DataFusion carried the error.
    pub fn facts(&self) -> Option<&Failure> {
        match self {
            Error::Destination { facts, .. } => Some(facts),
            Error::DataFusion(e) => datafusion_facts(e),
            _ => None,
        }
    }

    /// This error with `facts` (a write error becomes a destination's failure).
    pub fn with_facts(self, facts: Failure) -> Self {
        match self {
            Error::Write { message } | Error::Destination { message, .. } => {
                Error::destination(message, facts)
            }
            other => other,
        }
    }

    /// Names the connection and object of a destination's failure that does not name them yet.
    pub fn at(self, connection: &str, object: &str) -> Self {
        match self {
            Error::Destination { message, mut facts } => {
                facts
                    .connection
                    .get_or_insert_with(|| connection.to_string());
                facts.object.get_or_insert_with(|| object.to_string());
                Error::Destination { message, facts }
            }
            other => other,
        }
    }

    /// The identifier this error is about, used to point at it in the statement text.
    pub fn token(&self) -> Option<String> {
        match self {
            Error::UnknownConnection { name, .. } | Error::ConnectionExists { name } => {
                Some(name.clone())
            }
            Error::UnknownKind { kind, .. } => Some(kind.clone()),
            Error::Option { key, .. } => Some(key.clone()),
            Error::Plan { token, .. } => token.clone(),
            Error::DataFusion(e) => datafusion_token(e),
            _ => None,
        }
    }

    /// The 1-based (line, column) the error itself carries (parse errors), if any.
    pub fn location(&self) -> Option<(u64, u64)> {
        match self {
            Error::Parse { line, column, .. } if *line > 0 => Some((*line, *column)),
            Error::DataFusion(DataFusionError::SQL(e, _)) => split_location(&e.to_string()).1,
            _ => None,
        }
    }
}

/// Strips sqlparser's " at Line: L, Column: C" suffix from a message and returns it separately.
pub(crate) fn split_location(message: &str) -> (String, Option<(u64, u64)>) {
    if let Some(at) = message.rfind(" at Line: ") {
        let rest = &message[at + " at Line: ".len()..];
        let mut parts = rest.splitn(2, ", Column: ");
        let line = parts.next().and_then(|l| l.trim().parse::<u64>().ok());
        let column = parts.next().and_then(|c| {
            c.chars()
                .take_while(|ch| ch.is_ascii_digit())
                .collect::<String>()
                .parse::<u64>()
                .ok()
        });
        if let (Some(line), Some(column)) = (line, column) {
            return (message[..at].to_string(), Some((line, column)));
        }
    }
    (message.to_string(), None)
}

/// DataFusion's message with its location suffix removed and advice appended where we have some.
fn describe_datafusion(e: &DataFusionError) -> String {
    let root = e.find_root();
    let (message, _) = split_location(&root.to_string());
    // One line per problem: `file:line:col: message` is read by people and editors alike.
    let message = message
        .trim_start_matches("Error during planning: ")
        .trim_start_matches("SQL error: ")
        .trim_start_matches("Execution error: ")
        .trim_start_matches("Schema error: ")
        .trim_start_matches("Arrow error: ")
        .trim_start_matches("External error: ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if message.contains("not found") && message.starts_with("table '") {
        format!(
            "{message}; check the name, or list what exists with SHOW TABLES (REPL: \\d) and SHOW CONNECTIONS"
        )
    } else if message.starts_with("No field named") && !message.contains("Valid fields") {
        format!("{message} DESCRIBE the table to see its columns")
    } else if message.starts_with("Cast error") {
        format!("{message}; fix the value in the source, or use TRY_CAST to turn it into NULL")
    } else {
        message
    }
}

/// The facts of a destination's failure that DataFusion wrapped (a sink's error comes back as
/// `External`, possibly under `Context` or `Shared`).
fn datafusion_facts(e: &DataFusionError) -> Option<&Failure> {
    match e {
        DataFusionError::External(inner) => inner.downcast_ref::<Error>().and_then(Error::facts),
        DataFusionError::Context(_, inner) => datafusion_facts(inner),
        DataFusionError::Shared(inner) => datafusion_facts(inner),
        _ => None,
    }
}

/// Picks the identifier out of DataFusion's common messages ("table 'a.b.c' not found",
/// "No field named x").
fn datafusion_token(e: &DataFusionError) -> Option<String> {
    let message = e.find_root().to_string();
    if let Some(start) = message.find("table '") {
        let rest = &message[start + 7..];
        let name = rest.split('\'').next()?;
        return name.rsplit('.').next().map(str::to_string);
    }
    if let Some(start) = message.find("No field named ") {
        // "No field named x." / "No field named t.x." / "No field named \"X\"."
        let word = message[start + 15..].split_whitespace().next()?;
        let word = word.trim_end_matches(['.', ',']);
        let name = word.rsplit('.').next()?.trim_matches('"');
        return (!name.is_empty()).then(|| name.to_string());
    }
    None
}

impl From<Error> for DataFusionError {
    fn from(e: Error) -> Self {
        match e {
            Error::DataFusion(e) => e,
            other => DataFusionError::External(Box::new(other)),
        }
    }
}

impl From<datafusion::arrow::error::ArrowError> for Error {
    fn from(e: datafusion::arrow::error::ArrowError) -> Self {
        Error::DataFusion(e.into())
    }
}

impl From<datafusion::sql::sqlparser::parser::ParserError> for Error {
    fn from(e: datafusion::sql::sqlparser::parser::ParserError) -> Self {
        let text = e.to_string();
        let text = text.trim_start_matches("sql parser error: ").to_string();
        let (message, location) = split_location(&text);
        let (line, column) = location.unwrap_or((0, 0));
        Error::Parse {
            message,
            line,
            column,
        }
    }
}

/// Closest candidate to `name` (by Jaro-Winkler similarity), for "did you mean" hints.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let lower = name.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(&lower, &c.to_lowercase()), c))
        .filter(|(score, _)| *score >= 0.75)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// " (did you mean 'x'?)" or "".
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    closest(name, candidates)
        .map(|c| format!(" (did you mean '{c}'?)"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_sqlparser_location() {
        let (m, loc) = split_location("Expected: end of statement, found: x at Line: 3, Column: 7");
        assert_eq!(m, "Expected: end of statement, found: x");
        assert_eq!(loc, Some((3, 7)));
        assert_eq!(split_location("no location").1, None);
    }

    #[test]
    fn finds_tokens_in_datafusion_messages() {
        let e = DataFusionError::Plan("table 'datafusion.out.contactz' not found".into());
        assert_eq!(datafusion_token(&e).as_deref(), Some("contactz"));
        let e = DataFusionError::Plan("No field named emial. Valid fields are a, b.".into());
        assert_eq!(datafusion_token(&e).as_deref(), Some("emial"));
        let e = DataFusionError::Plan("No field named c.emial. Valid fields are a.".into());
        assert_eq!(datafusion_token(&e).as_deref(), Some("emial"));
    }

    #[test]
    fn a_destination_failure_keeps_its_facts_through_datafusion() {
        let failure = Error::destination(
            "hubspot crm: 403 MISSING_SCOPES",
            Failure {
                status: Some(403),
                code: Some("MISSING_SCOPES".into()),
                ..Default::default()
            },
        )
        .at("crm", "contacts");
        let wrapped = Error::DataFusion(DataFusionError::Context(
            "writing".into(),
            Box::new(DataFusionError::from(failure)),
        ));
        let facts = wrapped.facts().expect("the facts survive the wrapping");
        assert_eq!(facts.connection.as_deref(), Some("crm"));
        assert_eq!(facts.object.as_deref(), Some("contacts"));
        assert_eq!(facts.status, Some(403));
        assert_eq!(facts.code.as_deref(), Some("MISSING_SCOPES"));
        assert!(wrapped.to_string().contains("403 MISSING_SCOPES"));
        // A connection already named is kept.
        let named = Error::destination(
            "x",
            Failure {
                connection: Some("first".into()),
                ..Default::default()
            },
        )
        .at("second", "obj");
        assert_eq!(named.facts().unwrap().connection.as_deref(), Some("first"));
        assert!(Error::Cancelled.facts().is_none());
    }

    #[test]
    fn suggests_closest_name() {
        assert_eq!(closest("fromat", ["url", "format"]), Some("format"));
        assert_eq!(closest("zzz", ["url", "format"]), None);
    }
}
