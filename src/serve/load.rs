//! What `sluice serve` takes from the project's files: the definitions a sync needs
//! (connections, external tables, tables, views, settings, named syncs), in file order. Writes,
//! queries and `RUN SYNC` are what `sluice run` is for; they are skipped and counted.
//!
//! A reload plans the files' new text in a new session. A file that fails keeps its previous
//! text (the last that loaded), so one broken file never stops the others' changes, nor the
//! service.

use std::collections::BTreeMap;
use std::path::PathBuf;

use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;

use crate::engine::{Engine, Mode};
use crate::parser::{ParsedStatement, Statement, parse_sql_recovering};

/// The project's files and their text.
pub type Texts = Vec<(PathBuf, String)>;

/// What was loaded.
#[derive(Debug, Default)]
pub struct Loaded {
    pub files: usize,
    pub definitions: usize,
    pub skipped: usize,
    /// Where each sync is defined (`file:line`).
    pub locations: BTreeMap<String, String>,
}

/// A file that did not load.
#[derive(Debug, Clone)]
pub struct LoadError {
    pub file: PathBuf,
    /// `file:line:col: message`
    pub message: String,
}

/// Whether `statement` defines something a sync may use (rather than writing or reading).
fn is_definition(statement: &ParsedStatement) -> bool {
    match &statement.statement {
        Statement::CreateConnection(_)
        | Statement::DropConnection { .. }
        | Statement::CreateSync(_)
        | Statement::DropSync { .. }
        | Statement::CreateAlert(_)
        | Statement::DropAlert { .. } => true,
        Statement::Sql(sql) => match sql.as_ref() {
            DFStatement::CreateExternalTable(_) => true,
            DFStatement::Statement(s) => matches!(
                s.as_ref(),
                SqlStatement::CreateView(_)
                    | SqlStatement::CreateTable(_)
                    | SqlStatement::CreateSchema { .. }
                    | SqlStatement::Set(_)
                    | SqlStatement::Drop { .. }
            ),
            _ => false,
        },
        _ => false,
    }
}

/// The `.sql` files of `paths` and their text.
pub fn read(paths: &[PathBuf]) -> Result<Texts, String> {
    crate::project::sql_files(paths)?
        .into_iter()
        .map(|file| crate::project::read_sql(&file).map(|text| (file, text)))
        .collect()
}

/// Runs every definition of `texts` in `engine`; the first one that fails stops the load,
/// named by `file:line:col`.
pub async fn load(engine: &Engine, texts: &Texts) -> Result<Loaded, LoadError> {
    let mut loaded = Loaded {
        files: texts.len(),
        ..Default::default()
    };
    for (file, sql) in texts {
        let source = file.display().to_string();
        let fail = |message: String| LoadError {
            file: file.clone(),
            message,
        };
        let (statements, errors) = parse_sql_recovering(sql);
        if let Some(e) = errors.first() {
            let (line, column) = crate::project::error_position(None, e);
            return Err(fail(format!("{source}:{line}:{column}: {e}")));
        }
        for statement in &statements {
            if !is_definition(statement) {
                tracing::debug!(
                    at = %format!("{source}:{}", statement.line),
                    "Skipped: sluice serve loads definitions; syncs run on their schedules or through the API."
                );
                loaded.skipped += 1;
                continue;
            }
            if let Err(e) = engine.execute(statement, Mode::Run).await {
                let (line, column) = crate::project::error_position(Some(statement), &e);
                return Err(fail(format!("{source}:{line}:{column}: {e}")));
            }
            if let Statement::CreateSync(create) = &statement.statement {
                loaded
                    .locations
                    .insert(create.name.clone(), format!("{source}:{}", statement.line));
            }
            loaded.definitions += 1;
        }
    }
    Ok(loaded)
}

/// Loads `texts` into sessions from `new_engine` until one loads: each file that fails is
/// put back to its text in `good` (a new file that fails is left out). Answers the session,
/// what it loaded, the texts it loaded and the errors of the files put back.
pub async fn load_keeping(
    new_engine: &(dyn Fn() -> crate::Result<Engine> + Send + Sync),
    texts: &Texts,
    good: &Texts,
) -> Result<(Engine, Loaded, Texts, Vec<LoadError>), LoadError> {
    let mut attempt = texts.clone();
    let mut errors: Vec<LoadError> = vec![];
    loop {
        let engine = new_engine().map_err(|e| LoadError {
            file: PathBuf::new(),
            message: e.to_string(),
        })?;
        match load(&engine, &attempt).await {
            Ok(loaded) => return Ok((engine, loaded, attempt, errors)),
            Err(e) => {
                if errors.iter().any(|seen| seen.file == e.file) {
                    // Its previous text failed too (something it uses changed): give up.
                    return Err(e);
                }
                let previous = good.iter().find(|(f, _)| *f == e.file);
                let at = attempt.iter().position(|(f, _)| *f == e.file);
                match (previous, at) {
                    (Some((_, text)), Some(i)) if attempt[i].1 != *text => {
                        attempt[i].1 = text.clone();
                    }
                    (None, Some(i)) => {
                        attempt.remove(i);
                    }
                    _ => return Err(e),
                }
                errors.push(e);
            }
        }
    }
}
