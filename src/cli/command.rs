//! The REPL's backslash commands: `\?`, `\q`, `\d`, `\d NAME`, `\timing`, `\format`.

use std::str::FromStr;

use super::print_format::PrintFormat;

/// A backslash command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Quit,
    Help,
    /// `\d`: connections and tables.
    List,
    /// `\d NAME`: columns and types of a table or destination object.
    Describe(String),
    /// `\timing [on|off]`
    Timing(Option<bool>),
    /// `\format table|csv|json`
    Format(PrintFormat),
}

/// Whether the REPL goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Quit,
}

pub(super) const HELP: &str = "\
\\?                 this help
\\q                 quit
\\d                 list connections and tables
\\d NAME            columns and types of a table or destination object (e.g. \\d out.contacts)
\\timing [on|off]   print how long each statement takes
\\format FORMAT     print results as table, csv or json

Statements end with ';' and may span lines. Ctrl-C cancels a running statement. Tab completes
keywords, connections, objects, columns, and option names inside OPTIONS (…).
SQL: everything DataFusion runs, plus
  CREATE [OR REPLACE] CONNECTION name TYPE kind OPTIONS (key 'value', secret env('VAR'), ...);
  DROP CONNECTION [IF EXISTS] name;   SHOW CONNECTIONS;
  SHOW CONNECTION TYPES;   DESCRIBE CONNECTION TYPE kind;   SHOW OBJECTS IN name;
  INSERT INTO conn.object SELECT ...;   MERGE INTO conn.object AS t USING ... ON t.key = s.key WHEN ...;
  DELETE FROM conn.object WHERE key IN (SELECT ...);
  CREATE [OR REPLACE] SYNC name [SCHEDULE EVERY '1 hour' | CRON '0 * * * *'] [OPTIONS (...)] AS <INSERT|MERGE|DELETE>;
  RUN SYNC name [SAMPLE n | SAMPLE WHERE key IN (...)];   EXPLAIN SYNC name;   RESET SYNC name;
  SHOW SYNCS;   DROP SYNC name;
  SELECT * FROM sluice.runs;   SELECT * FROM sluice.rejects;";

impl FromStr for Command {
    type Err = String;

    fn from_str(input: &str) -> Result<Self, String> {
        let input = input.trim().trim_end_matches(';');
        let mut parts = input.splitn(2, char::is_whitespace);
        let head = parts.next().unwrap_or("");
        let arg = parts.next().map(str::trim).filter(|a| !a.is_empty());
        match (head, arg) {
            ("\\q" | "\\quit", None) => Ok(Command::Quit),
            ("\\?" | "\\h" | "\\help", _) => Ok(Command::Help),
            ("\\d", None) => Ok(Command::List),
            ("\\d", Some(name)) => Ok(Command::Describe(name.to_string())),
            ("\\timing", None) => Ok(Command::Timing(None)),
            ("\\timing", Some("on")) => Ok(Command::Timing(Some(true))),
            ("\\timing", Some("off")) => Ok(Command::Timing(Some(false))),
            ("\\format", Some(f)) => f.parse().map(Command::Format),
            ("\\format", None) => Err("\\format needs a format: table, csv or json".into()),
            _ => Err(format!("unknown command '{input}'; \\? lists the commands")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!("\\q".parse::<Command>(), Ok(Command::Quit));
        assert_eq!("\\d".parse::<Command>(), Ok(Command::List));
        assert_eq!(
            "\\d out.contacts".parse::<Command>(),
            Ok(Command::Describe("out.contacts".into()))
        );
        assert_eq!("\\timing".parse::<Command>(), Ok(Command::Timing(None)));
        assert_eq!(
            "\\format csv".parse::<Command>(),
            Ok(Command::Format(PrintFormat::Csv))
        );
        assert!("\\format xml".parse::<Command>().is_err());
        assert!("\\nope".parse::<Command>().unwrap_err().contains("\\?"));
    }
}
