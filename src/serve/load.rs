//! What `sluice serve` takes from the project's files: the definitions a sync needs
//! (connections, external tables, tables, views, settings, named syncs), in file order. Writes,
//! queries and `RUN SYNC` are what `sluice run` is for; they are skipped and counted.

use std::path::PathBuf;

use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;

use crate::engine::{Engine, Mode};
use crate::parser::{ParsedStatement, Statement, parse_sql_recovering};

/// What was loaded.
#[derive(Debug, Default)]
pub struct Loaded {
    pub files: usize,
    pub definitions: usize,
    pub skipped: usize,
}

/// Whether `statement` defines something a sync may use (rather than writing or reading).
fn is_definition(statement: &ParsedStatement) -> bool {
    match &statement.statement {
        Statement::CreateConnection(_)
        | Statement::DropConnection { .. }
        | Statement::CreateSync(_)
        | Statement::DropSync { .. } => true,
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

/// Runs every definition of `paths`; the first one that fails stops the load, named by
/// `file:line:col`.
pub async fn load(engine: &Engine, paths: &[PathBuf]) -> Result<Loaded, String> {
    let files = crate::project::sql_files(paths)?;
    let mut loaded = Loaded {
        files: files.len(),
        ..Default::default()
    };
    for file in &files {
        let source = file.display().to_string();
        let sql = crate::project::read_sql(file)?;
        let (statements, errors) = parse_sql_recovering(&sql);
        if let Some(e) = errors.first() {
            let (line, column) = crate::project::error_position(None, e);
            return Err(format!("{source}:{line}:{column}: {e}"));
        }
        for statement in &statements {
            if !is_definition(statement) {
                tracing::info!(
                    at = %format!("{source}:{}", statement.line),
                    "Skipped: sluice serve loads definitions; syncs run on their schedules or through the API."
                );
                loaded.skipped += 1;
                continue;
            }
            if let Err(e) = engine.execute(statement, Mode::Run).await {
                let (line, column) = crate::project::error_position(Some(statement), &e);
                return Err(format!("{source}:{line}:{column}: {e}"));
            }
            loaded.definitions += 1;
        }
    }
    Ok(loaded)
}
