//! Running statements from files, `-c` and the REPL, and reporting errors at `file:line:col`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustyline::error::ReadlineError;
use rustyline::history::FileHistory;
use rustyline::{Config, Editor};

use super::Status;
use super::command::{Command, Flow, HELP};
use super::helper::SluiceHelper;
use super::json_output;
use super::print_format::Output;
use super::print_format::PrintOptions;
use crate::engine::{Engine, Mode, Outcome};
use crate::error::{Error, Result};
use crate::parser::{ParsedStatement, parse_sql_recovering};
use crate::project::error_position;

/// Runs one statement, cancelled by Ctrl-C.
async fn execute_cancellable(
    engine: &Engine,
    statement: &ParsedStatement,
    mode: Mode,
) -> Result<Outcome> {
    tokio::select! {
        result = engine.execute(statement, mode) => result,
        _ = tokio::signal::ctrl_c() => Err(Error::Cancelled),
    }
}

/// Reports an error at `file:line:col` on stderr, and with `--output json` as a JSON line
/// on stdout too.
fn report(source: &str, statement: Option<&ParsedStatement>, error: &Error, output: Output) {
    let (line, column) = error_position(statement, error);
    eprintln!("{source}:{line}:{column}: {error}");
    if output == Output::Json {
        println!(
            "{}",
            json_output::error(source, statement, (line, column), error)
        );
    }
}

/// Problems of one file, printed in line order.
#[derive(Default)]
struct Problems(Vec<(u64, u64, String)>);

impl Problems {
    fn add(&mut self, statement: Option<&ParsedStatement>, error: &Error) {
        let (line, column) = error_position(statement, error);
        self.0.push((line, column, error.to_string()));
    }

    fn print(mut self, source: &str, output: Output) -> usize {
        self.0.sort_by_key(|(line, column, _)| (*line, *column));
        for (line, column, message) in &self.0 {
            eprintln!("{source}:{line}:{column}: {message}");
            if output == Output::Json {
                println!(
                    "{}",
                    json_output::problem(source, (*line, *column), message)
                );
            }
        }
        self.0.len()
    }
}

/// Runs every statement of one SQL text; stops at the first error.
pub async fn run_source(
    engine: &Engine,
    source: &str,
    sql: &str,
    print: &PrintOptions,
    mode: Mode,
) -> Status {
    let (statements, errors) = parse_sql_recovering(sql);
    if !errors.is_empty() {
        for e in &errors {
            report(source, None, e, print.output);
        }
        return Status::Error;
    }
    run_statements(engine, source, &statements, print, mode).await
}

async fn run_statements(
    engine: &Engine,
    source: &str,
    statements: &[ParsedStatement],
    print: &PrintOptions,
    mode: Mode,
) -> Status {
    let mut status = Status::Ok;
    let mut stdout = std::io::stdout();
    for statement in statements {
        match execute_cancellable(engine, statement, mode).await {
            Ok(outcome) => {
                if outcome.rejected() > 0 {
                    status = Status::Rejected;
                }
                if print.output == Output::Json {
                    let line = json_output::outcome(source, statement, &outcome);
                    let _ = writeln!(stdout, "{line}");
                } else if let Err(e) = print.print(&outcome, &mut stdout) {
                    report(source, Some(statement), &e, print.output);
                    return Status::Error;
                }
                let _ = stdout.flush();
            }
            Err(e) => {
                report(source, Some(statement), &e, print.output);
                return Status::Error;
            }
        }
    }
    status
}

/// Expands directories into their `*.sql` files in name order.
/// `sluice run`: parses every file first (a syntax error anywhere runs nothing), then runs them
/// in order and stops at the first error.
pub async fn run_paths(
    engine: &Engine,
    paths: &[PathBuf],
    print: &PrintOptions,
    mode: Mode,
) -> Status {
    let files = match crate::project::sql_files(paths) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("{e}");
            return Status::Error;
        }
    };
    let mut parsed = vec![];
    let mut failed = false;
    for file in &files {
        let sql = match crate::project::read_sql(file) {
            Ok(sql) => sql,
            Err(e) => {
                eprintln!("{e}");
                return Status::Error;
            }
        };
        let (statements, errors) = parse_sql_recovering(&sql);
        for e in &errors {
            report(&file.display().to_string(), None, e, print.output);
        }
        failed |= !errors.is_empty();
        parsed.push((file.display().to_string(), statements));
    }
    if failed {
        return Status::Error;
    }
    let mut status = Status::Ok;
    for (source, statements) in &parsed {
        status = super::worst(
            status,
            run_statements(engine, source, statements, print, mode).await,
        );
        if status == Status::Error {
            break;
        }
    }
    status
}

/// `sluice check`: parses and plans every statement, reporting every problem.
pub async fn check_paths(engine: &Engine, paths: &[PathBuf], output: Output) -> Status {
    let files = match crate::project::sql_files(paths) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("{e}");
            return Status::Error;
        }
    };
    let mut problems = 0;
    let mut checked = 0;
    for file in &files {
        let source = file.display().to_string();
        let sql = match crate::project::read_sql(file) {
            Ok(sql) => sql,
            Err(e) => {
                eprintln!("{e}");
                problems += 1;
                continue;
            }
        };
        let (statements, errors) = parse_sql_recovering(&sql);
        let mut found = Problems::default();
        for e in &errors {
            found.add(None, e);
        }
        for statement in &statements {
            checked += 1;
            if let Err(e) = execute_cancellable(engine, statement, Mode::Check).await {
                found.add(Some(statement), &e);
            }
        }
        problems += found.print(&source, output);
    }
    let files_word = if files.len() == 1 { "file" } else { "files" };
    if output == Output::Json {
        println!("{}", json_output::checked(checked, files.len(), problems));
        return if problems == 0 {
            Status::Ok
        } else {
            Status::Error
        };
    }
    if problems == 0 {
        println!(
            "checked {checked} statements in {} {files_word}: ok",
            files.len()
        );
        Status::Ok
    } else {
        eprintln!(
            "checked {checked} statements in {} {files_word}: {problems} problem{}",
            files.len(),
            if problems == 1 { "" } else { "s" }
        );
        Status::Error
    }
}

/// The history file: `$SLUICE_HISTORY`, else `~/.sluice_history`.
fn history_path() -> PathBuf {
    std::env::var_os("SLUICE_HISTORY")
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".sluice_history")))
        .unwrap_or_else(|| PathBuf::from(".sluice_history"))
}

/// The interactive shell.
pub async fn repl(engine: &Engine, print: &mut PrintOptions) -> rustyline::Result<()> {
    let words = Arc::new(RwLock::new(engine.completion_words().await));
    let config = Config::builder().auto_add_history(false).build();
    let mut editor: Editor<SluiceHelper, FileHistory> = Editor::with_config(config)?;
    editor.set_helper(Some(SluiceHelper::new(
        Arc::clone(&words),
        engine.option_keys(),
    )));
    let history = history_path();
    let _ = editor.load_history(&history);
    println!(
        "sluice {} — \\? for help, \\q to quit",
        env!("CARGO_PKG_VERSION")
    );
    loop {
        match editor.readline("sluice> ") {
            Ok(input) => {
                let input = input.trim();
                if input.is_empty() {
                    continue;
                }
                editor.add_history_entry(input)?;
                let _ = editor.save_history(&history);
                if input.starts_with('\\') {
                    match input.parse::<Command>() {
                        Ok(command) => {
                            if execute_command(&command, engine, print).await == Flow::Quit {
                                break;
                            }
                        }
                        Err(e) => eprintln!("{e}"),
                    }
                } else {
                    run_interactive(engine, input, print).await;
                }
                *words.write().expect("completion lock") = engine.completion_words().await;
            }
            Err(ReadlineError::Interrupted) => {
                println!("^C (\\q to quit)");
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e),
        }
    }
    let _ = editor.save_history(&history);
    Ok(())
}

/// Runs what was typed at the prompt; an error is printed and the shell carries on.
async fn run_interactive(engine: &Engine, input: &str, print: &PrintOptions) {
    let (statements, errors) = parse_sql_recovering(input);
    if let Some(e) = errors.first() {
        let (line, column) = error_position(None, e);
        eprintln!("error at line {line}, column {column}: {e}");
        return;
    }
    let mut stdout = std::io::stdout();
    for statement in &statements {
        let started = std::time::Instant::now();
        match execute_cancellable(engine, statement, Mode::Run).await {
            Ok(outcome) => {
                if let Err(e) = print.print(&outcome, &mut stdout) {
                    eprintln!("error: {e}");
                }
                if print.timing {
                    println!(
                        "Time: {}",
                        crate::engine::format_duration(started.elapsed())
                    );
                }
            }
            Err(Error::Cancelled) => {
                eprintln!("Cancelled.");
                return;
            }
            Err(e) => {
                let (line, column) = error_position(Some(statement), &e);
                eprintln!("error at line {line}, column {column}: {e}");
                return;
            }
        }
        let _ = stdout.flush();
    }
}

/// Runs a backslash command of the REPL.
async fn execute_command(command: &Command, engine: &Engine, print: &mut PrintOptions) -> Flow {
    match command {
        Command::Quit => return Flow::Quit,
        Command::Help => println!("{HELP}"),
        Command::List => {
            run_source(engine, "\\d", "SHOW CONNECTIONS", print, crate::Mode::Run).await;
            let tables = "SELECT table_schema AS schema, table_name AS name, table_type AS type \
                              FROM information_schema.tables \
                              WHERE table_schema <> 'information_schema' ORDER BY 1, 2";
            run_source(engine, "\\d", tables, print, crate::Mode::Run).await;
        }
        Command::Describe(name) => {
            run_source(
                engine,
                "\\d",
                &format!("DESCRIBE {name}"),
                print,
                crate::Mode::Run,
            )
            .await;
        }
        Command::Timing(on) => {
            print.timing = on.unwrap_or(!print.timing);
            println!("Timing is {}.", if print.timing { "on" } else { "off" });
        }
        Command::Format(format) => {
            print.format = *format;
            println!("Output format is {format:?}.");
        }
    }
    Flow::Continue
}
