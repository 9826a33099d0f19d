//! A project: the `.sql` files `sluice run`, `check` and `serve` take.

use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::parser::{ParsedStatement, locate_token};

/// The `.sql` files of `paths`: each file as given, each directory's `*.sql` in name order.
pub fn sql_files(paths: &[PathBuf]) -> std::result::Result<Vec<PathBuf>, String> {
    let mut files = vec![];
    for path in paths {
        if path.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| format!("{}: cannot read directory: {e}", path.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "sql"))
                .collect();
            in_dir.sort();
            if in_dir.is_empty() {
                return Err(format!(
                    "{}: no .sql files in this directory",
                    path.display()
                ));
            }
            files.extend(in_dir);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            return Err(format!(
                "{}: no such file or directory; pass a .sql file or a directory of them",
                path.display()
            ));
        }
    }
    Ok(files)
}

/// A file's text, or an error that names it.
pub fn read_sql(path: &Path) -> std::result::Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

/// Where an error points: the location the error carries, else its token inside the statement,
/// else the statement's start.
pub fn error_position(statement: Option<&ParsedStatement>, error: &Error) -> (u64, u64) {
    if let Some(at) = error.location() {
        return at;
    }
    let Some(statement) = statement else {
        return (1, 1);
    };
    if let Some(token) = error.token()
        && let Some((line, column)) = locate_token(&statement.text, &token)
    {
        return if line == 1 {
            (statement.line, statement.column + column - 1)
        } else {
            (statement.line + line - 1, column)
        };
    }
    (statement.line, statement.column)
}
