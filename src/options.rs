//! Connection options: literal values, `env('VAR')` and `file('path')` references, secrets that
//! cannot be printed, and typed consumption that rejects unknown keys.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result, did_you_mean};

/// One option value as written in `OPTIONS (...)`.
#[derive(Clone, PartialEq, Eq)]
pub enum OptionValue {
    /// `'text'`, a number or a bare word.
    Literal(String),
    /// `env('VAR')`: read from the environment when the connection is created.
    Env(String),
    /// `file('path')`: read from a file (trailing newline removed) when the connection is created.
    File(String),
}

impl fmt::Display for OptionValue {
    /// Shows the value as written. Literals are quoted; use [`Options::redacted`] to print options,
    /// which hides secret literals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionValue::Literal(v) => write!(f, "'{}'", v.replace('\'', "''")),
            OptionValue::Env(v) => write!(f, "env('{v}')"),
            OptionValue::File(v) => write!(f, "file('{v}')"),
        }
    }
}

impl fmt::Debug for OptionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionValue::Literal(_) => f.write_str("Literal(..)"),
            OptionValue::Env(v) => write!(f, "Env({v})"),
            OptionValue::File(v) => write!(f, "File({v})"),
        }
    }
}

/// A credential. It has no `Display`, its `Debug` prints `Secret(***)`, and the only way to read it
/// is [`Secret::expose`], which makes every use greppable.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value, for building a request. Never log or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The documentation of one option a connection kind accepts. A key ending in `.*` (such as
/// `header.*`) accepts any key with that prefix. `DESCRIBE CONNECTION TYPE`, the REPL's
/// completion and the book's option tables (`sluice docs options`) all read these.
#[derive(Debug, Clone, Copy)]
pub struct OptionSpec {
    pub key: &'static str,
    /// The values it takes: `integer`, `duration`, `url`, … or the choices (`jsonl | csv`).
    pub value: &'static str,
    /// What applies when it is not given; empty when nothing does (required, or off).
    pub default: &'static str,
    /// One line for users: what it does.
    pub doc: &'static str,
    /// A secret option's literal value is never shown.
    pub secret: bool,
}

impl OptionSpec {
    pub const fn new(
        key: &'static str,
        value: &'static str,
        default: &'static str,
        doc: &'static str,
    ) -> Self {
        Self {
            key,
            value,
            default,
            doc,
            secret: false,
        }
    }

    /// The same option, as a secret.
    pub const fn secret(self) -> Self {
        Self {
            secret: true,
            ..self
        }
    }

    fn matches(&self, key: &str) -> bool {
        match self.key.strip_suffix('*') {
            Some(prefix) => key.starts_with(prefix) && key.len() > prefix.len(),
            None => self.key == key,
        }
    }
}

/// The options of one `CREATE CONNECTION`, consumed key by key by the connection kind.
///
/// Unknown and duplicate keys are rejected up front, listing the valid keys.
#[derive(Debug, Clone)]
pub struct Options {
    kind: String,
    specs: &'static [OptionSpec],
    given: Vec<(String, OptionValue)>,
}

impl Options {
    pub fn new(
        kind: &str,
        specs: &'static [OptionSpec],
        given: Vec<(String, OptionValue)>,
    ) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for (key, _) in &given {
            if !specs.iter().any(|s| s.matches(key)) {
                let valid: Vec<&str> = specs.iter().map(|s| s.key).collect();
                return Err(Error::Option {
                    key: key.clone(),
                    message: format!(
                        "unknown option '{key}' for {}{}; valid options: {}",
                        if kind == "sync" {
                            "CREATE SYNC".to_string()
                        } else {
                            format!("connection type '{kind}'")
                        },
                        did_you_mean(key, valid.iter().copied()),
                        valid.join(", ")
                    ),
                });
            }
            if !seen.insert(key.clone()) {
                return Err(Error::Option {
                    key: key.clone(),
                    message: format!("option '{key}' is given more than once; keep one"),
                });
            }
        }
        Ok(Self {
            kind: kind.to_string(),
            specs,
            given,
        })
    }

    fn raw(&self, key: &str) -> Option<&OptionValue> {
        debug_assert!(
            self.specs.iter().any(|s| s.key == key),
            "option {key} is read but not declared"
        );
        self.given.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Resolves a value, reading `env()` and `file()` references.
    fn resolve(&self, key: &str, value: &OptionValue) -> Result<String> {
        match value {
            OptionValue::Literal(v) => Ok(v.clone()),
            OptionValue::Env(var) => std::env::var(var).map_err(|_| Error::Option {
                key: key.to_string(),
                message: format!(
                    "option '{key}' reads env('{var}'), but the environment variable {var} is not set; export it before running"
                ),
            }),
            OptionValue::File(path) => std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| Error::Option {
                    key: key.to_string(),
                    message: format!("option '{key}' reads file('{path}'), which cannot be read: {e}"),
                }),
        }
    }

    /// Whether the option's value comes from `env()` or `file()`: what a user keeps out of their
    /// files is a secret as a whole, whatever the option.
    pub fn from_outside(&self, key: &str) -> bool {
        matches!(
            self.raw(key),
            Some(OptionValue::Env(_) | OptionValue::File(_))
        )
    }

    /// A plain (non-secret) option, if given.
    pub fn string(&self, key: &str) -> Result<Option<String>> {
        self.raw(key).map(|v| self.resolve(key, v)).transpose()
    }

    /// A plain option that must be given.
    pub fn required_string(&self, key: &str) -> Result<String> {
        self.string(key)?.ok_or_else(|| Error::Option {
            key: key.to_string(),
            message: format!(
                "connection type '{}' needs option '{key}' ({})",
                self.kind,
                self.spec(key).map(|s| s.doc).unwrap_or("")
            ),
        })
    }

    /// A secret option, if given.
    pub fn secret(&self, key: &str) -> Result<Option<Secret>> {
        Ok(self.string(key)?.map(Secret))
    }

    /// An option parsed into a typed value; a value that does not parse names the key and the
    /// valid values.
    pub fn parse<T>(&self, key: &str) -> Result<Option<T>>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let Some(raw) = self.string(key)? else {
            return Ok(None);
        };
        raw.parse::<T>().map(Some).map_err(|e| Error::Option {
            key: key.to_string(),
            message: match self.spec(key) {
                Some(spec) => format!(
                    "option '{key}' = '{raw}' is not valid: {e}; it takes {}",
                    spec.value
                ),
                None => format!("option '{key}' = '{raw}' is not valid: {e}"),
            },
        })
    }

    fn spec(&self, key: &str) -> Option<&OptionSpec> {
        self.specs.iter().find(|s| s.matches(key))
    }

    /// Every option whose key starts with `prefix` (a `prefix*` spec), as (rest of key, value).
    /// Values are treated as secrets.
    pub fn prefixed(&self, prefix: &str) -> Result<Vec<(String, Secret)>> {
        self.given
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|rest| (k, rest, v)))
            .map(|(k, rest, v)| Ok((rest.to_string(), Secret(self.resolve(k, v)?))))
            .collect()
    }

    /// The options as they can be shown to anyone: `env()`/`file()` references as written, secret
    /// literals as `'***'`, and passwords inside URLs masked.
    pub fn redacted(&self) -> String {
        self.given
            .iter()
            .map(|(k, v)| {
                let secret = self.spec(k).is_some_and(|s| s.secret);
                let shown = match v {
                    OptionValue::Literal(_) if secret => "'***'".to_string(),
                    OptionValue::Literal(lit) => {
                        OptionValue::Literal(redact_url_password(lit)).to_string()
                    }
                    other => other.to_string(),
                };
                format!("{k} {shown}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The longest duration an option may give.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// `'30s'`, `'500ms'`, `'5m'`, `'1h'`, `'2 days'`, or a plain number of seconds (`'2.5'`); at
/// most 30 days.
pub fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    parse_duration_within(s, MAX_DURATION)
}

/// How long a retention option may keep something: ten years.
pub const MAX_RETENTION: std::time::Duration = std::time::Duration::from_secs(3650 * 24 * 3600);

/// As [`parse_duration`], at most `max`.
pub fn parse_duration_within(
    s: &str,
    max: std::time::Duration,
) -> std::result::Result<std::time::Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|i| (&s[..i], s[i..].trim()))
        .unwrap_or((s, ""));
    let value: f64 = number
        .parse()
        .map_err(|_| "write a duration such as '30s', '500ms' or '5m'".to_string())?;
    let seconds = match unit {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => value,
        "ms" => value / 1000.0,
        "m" | "min" | "mins" | "minute" | "minutes" => value * 60.0,
        "h" | "hour" | "hours" => value * 3600.0,
        "d" | "day" | "days" => value * 86400.0,
        other => return Err(format!("unknown unit '{other}'; use ms, s, m, h or days")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err("a duration must be positive".into());
    }
    match std::time::Duration::try_from_secs_f64(seconds) {
        Ok(d) if d <= max => Ok(d),
        _ => Err(format!(
            "a duration may be at most {} days",
            max.as_secs() / 86400
        )),
    }
}

/// A URL as it may be shown (summaries, EXPLAIN, errors, run records): scheme, host and port
/// only when it came from `env()`/`file()` (its path or query string can carry a token), else
/// with its password masked.
pub fn shown_url(url: &url::Url, from_outside: bool) -> String {
    match from_outside {
        true => format!("{}/***", origin(url)),
        false => redact_url_password(url.as_str()),
    }
}

/// A base URL that paths are shown after: scheme, host and port only when it came from
/// `env()`/`file()`, else with its password masked (no trailing '/').
pub fn shown_base_url(url: &url::Url, from_outside: bool) -> String {
    match from_outside {
        true => origin(url),
        false => redact_url_password(url.as_str())
            .trim_end_matches('/')
            .to_string(),
    }
}

/// `scheme://host[:port]`: a URL without its credentials, path, query or fragment.
pub fn origin(url: &url::Url) -> String {
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    format!("{}://{}{port}", url.scheme(), url.host_str().unwrap_or(""))
}

/// `scheme://user:password@host/...` → `scheme://user:***@host/...`; anything else unchanged.
pub fn redact_url_password(value: &str) -> String {
    match url::Url::parse(value) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[OptionSpec] = &[
        OptionSpec::new("url", "url", "", "where"),
        OptionSpec::new("token", "text", "", "api token").secret(),
    ];

    fn lit(s: &str) -> OptionValue {
        OptionValue::Literal(s.into())
    }

    #[test]
    fn unknown_key_lists_valid_keys_and_suggests() {
        let err = Options::new("x", SPECS, vec![("tokn".into(), lit("a"))]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown option 'tokn'"), "{msg}");
        assert!(msg.contains("did you mean 'token'"), "{msg}");
        assert!(msg.contains("valid options: url, token"), "{msg}");
    }

    #[test]
    fn duplicate_key_is_an_error() {
        let err = Options::new(
            "x",
            SPECS,
            vec![("url".into(), lit("a")), ("url".into(), lit("b"))],
        )
        .unwrap_err();
        assert!(err.to_string().contains("more than once"));
    }

    #[test]
    fn missing_env_names_the_variable() {
        let opts = Options::new(
            "x",
            SPECS,
            vec![(
                "token".into(),
                OptionValue::Env("SLUICE_TEST_SURELY_UNSET".into()),
            )],
        )
        .unwrap();
        let msg = opts.secret("token").unwrap_err().to_string();
        assert!(msg.contains("SLUICE_TEST_SURELY_UNSET is not set"), "{msg}");
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("5 parsecs").is_err());
        // Issue 17: no duration panics, however long.
        for huge in [
            "99999999999999999999999",
            "1e300",
            "99999999999999999999999h",
            "31 days",
        ] {
            assert!(parse_duration(huge).is_err(), "{huge}");
        }
        assert_eq!(parse_duration("720h"), Ok(MAX_DURATION));
        assert_eq!(
            parse_duration("14 days"),
            Ok(Duration::from_secs(14 * 86400))
        );
        assert!(parse_duration("31 days").is_err());
        assert_eq!(
            parse_duration_within("365d", MAX_RETENTION),
            Ok(Duration::from_secs(365 * 86400))
        );
        assert!(parse_duration_within("3651 days", MAX_RETENTION).is_err());
    }

    #[test]
    fn prefixed_options() {
        const P: &[OptionSpec] = &[OptionSpec::new("header.*", "text", "", "").secret()];
        let opts = Options::new("x", P, vec![("header.x-team".into(), lit("growth"))]).unwrap();
        let headers = opts.prefixed("header.").unwrap();
        assert_eq!(headers[0].0, "x-team");
        assert_eq!(headers[0].1.expose(), "growth");
        assert_eq!(opts.redacted(), "header.x-team '***'");
        assert!(Options::new("x", P, vec![("header.".into(), lit("a"))]).is_err());
    }

    /// Issue 17: a URL from env()/file() is shown by its origin only (its path or query string
    /// may carry a token); a literal one with its password masked.
    #[test]
    fn urls_from_outside_show_their_origin_only() {
        let url =
            url::Url::parse("https://bob:pw@hooks.example.com:8443/t/tok_123?key=abc").unwrap();
        assert_eq!(shown_url(&url, true), "https://hooks.example.com:8443/***");
        assert_eq!(shown_base_url(&url, true), "https://hooks.example.com:8443");
        let shown = shown_url(&url, false);
        assert!(
            shown.contains("bob:***@") && !shown.contains(":pw@"),
            "{shown}"
        );
        let base = url::Url::parse("https://api.hubapi.com").unwrap();
        assert_eq!(shown_base_url(&base, false), "https://api.hubapi.com");
    }

    #[test]
    fn redaction_hides_secret_literals_and_url_passwords() {
        let opts = Options::new(
            "x",
            SPECS,
            vec![
                ("url".into(), lit("postgres://bob:hunter2@db/x")),
                ("token".into(), lit("sk-live-123")),
            ],
        )
        .unwrap();
        let shown = opts.redacted();
        assert!(
            !shown.contains("hunter2") && !shown.contains("sk-live-123"),
            "{shown}"
        );
        assert!(shown.contains("token '***'"), "{shown}");
        assert_eq!(format!("{:?}", Secret::new("sk")), "Secret(***)");
    }
}
