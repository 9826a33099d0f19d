//! The `sluice` command line: arguments, exit codes, and dispatch to the REPL, `run` and `check`.
//!
//! Exit codes are a contract: 0 ok, 1 finished but some records were rejected, 2 error.

mod command;
mod docs;
mod exec;
mod helper;
mod init;
mod json_output;
mod print_format;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

pub use print_format::Output;
pub use print_format::{PrintFormat, PrintOptions};

/// sluice: reverse ETL as SQL. Run with no arguments for the interactive shell.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about, long_about = None)]
pub struct Args {
    /// Run this SQL and exit (may be given several times; runs before any PATH of `run`).
    #[arg(short = 'c', long = "command", value_name = "SQL")]
    pub commands: Vec<String>,

    /// How query results are printed.
    #[arg(long, value_enum, default_value_t = PrintFormat::Table, global = true)]
    pub format: PrintFormat,

    /// Print only query results and errors (no statement summaries).
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// `json`: one JSON object per line on stdout for each statement run (its counts, rejects,
    /// run id) or each problem `check` finds, then a summary; for CI.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,

    /// Where sync state, run history and rejects live: a directory or an object store URL
    /// (s3://bucket/prefix, gs://…, az://…, file://…). Default: `.sluice` next to the files
    /// being run, or in the working directory.
    #[arg(long, value_name = "URL", env = "SLUICE_STATE", global = true)]
    pub state: Option<String>,

    /// Logs (on stderr): `text`, or `json` for one JSON object per line (a run's lines carry
    /// its sync and run id); the filter is SLUICE_LOG (e.g. `info`, `debug`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "SLUICE_LOG_FORMAT", global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run .sql files statement by statement (a directory: its *.sql files in name order).
    Run {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Send nothing: each sync prints what it would insert, update and delete, the API
        /// calls it would make, samples and an estimated duration. State is not changed.
        #[arg(long)]
        dry_run: bool,
        /// Try each sync on a few real records first: send only the first N records of each
        /// sync's diff (in key order), show every request and answer, and commit only those
        /// records' state. A later run sends the rest.
        #[arg(long, value_name = "N", conflicts_with = "dry_run", value_parser = clap::value_parser!(u64).range(1..))]
        sample: Option<u64>,
    },
    /// Run the project's named syncs on their SCHEDULE, with an HTTP API to run them now and
    /// read their runs (loads connections, tables, views and syncs; skips writes and queries).
    /// Stops on SIGTERM or Ctrl-C, letting running syncs finish within --shutdown-grace.
    Serve {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Address of the HTTP API (port 0: any free port, printed at start).
        #[arg(long, default_value = "127.0.0.1:8686")]
        listen: std::net::SocketAddr,
        /// Syncs running at once, at most (default: the number of cores).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        max_concurrent_syncs: Option<u64>,
        /// A file holding the bearer token that POST /api/… calls need (or SLUICE_API_TOKEN).
        /// Without one, the API is read-only and listens on loopback only.
        #[arg(long, value_name = "FILE")]
        api_token_file: Option<PathBuf>,
        /// How long running syncs may take to finish once asked to stop.
        #[arg(long, value_name = "DURATION", default_value = "30s")]
        shutdown_grace: String,
        /// The status page's address as people reach it (behind a proxy, say), for the links in
        /// alert notices; default: http://<listen address>/.
        #[arg(long, value_name = "URL")]
        public_url: Option<String>,
    },
    /// Parse and plan every statement without executing any query or write; report every
    /// problem as file:line:col: message.
    Check {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Write a new project: connections with env() placeholders, an example sync on bundled
    /// sample data, .gitignore and a README telling how to check, dry-run and run it.
    Init {
        /// Where (created if missing; files that exist are never overwritten).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Connection types to declare, comma-separated (SHOW CONNECTION TYPES lists them).
        #[arg(long, value_delimiter = ',', default_value = "webhook")]
        with: Vec<String>,
    },
    /// Print a shell completion script: `sluice completions bash > /etc/bash_completion.d/sluice`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Generate the book's option tables from the connectors' option specs.
    Docs {
        #[command(subcommand)]
        what: DocsCommand,
    },
}

/// `sluice docs …`
#[derive(Debug, Subcommand)]
pub enum DocsCommand {
    /// Rewrite the option table of every connection type's page (docs/src/connectors/<type>.md)
    /// and of the sync options' page; with --check, change nothing and fail if one differs.
    Options {
        /// The book's source folder.
        #[arg(long, default_value = "docs/src")]
        dir: PathBuf,
        #[arg(long)]
        check: bool,
    },
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Exit status of a finished invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Finished, but a destination rejected some records.
    Rejected,
    Error,
}

impl From<Status> for ExitCode {
    fn from(s: Status) -> Self {
        ExitCode::from(match s {
            Status::Ok => 0,
            Status::Rejected => 1,
            Status::Error => 2,
        })
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match &args.command {
        Some(Command::Completions { shell }) => {
            let mut command = <Args as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "sluice", &mut std::io::stdout());
            return Status::Ok.into();
        }
        Some(Command::Init { dir, with }) => return init::init(dir, with).into(),
        Some(Command::Docs {
            what: DocsCommand::Options { dir, check },
        }) => return docs::docs_options(dir, *check).into(),
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return Status::Error.into();
        }
    };
    runtime
        .block_on(async {
            let status = run(args).await;
            // A cancelled run's lock release and run record, before the process exits.
            crate::sync::cleanup::settle(std::time::Duration::from_secs(10)).await;
            status
        })
        .into()
}

async fn run(args: Args) -> Status {
    let mut engine = match crate::Engine::new() {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("error: {e}");
            return Status::Error;
        }
    };
    let state = args.state.clone().unwrap_or_else(|| {
        let paths = match &args.command {
            Some(
                Command::Run { paths, .. }
                | Command::Check { paths }
                | Command::Serve { paths, .. },
            ) => paths.as_slice(),
            _ => &[],
        };
        let dir = match paths.first() {
            Some(p) if p.is_dir() => p.clone(),
            Some(p) => p.parent().map(|d| d.to_path_buf()).unwrap_or_default(),
            None => PathBuf::new(),
        };
        dir.join(".sluice").display().to_string()
    });
    if let Err(e) = engine.set_state_location(&state) {
        eprintln!("error: {e}");
        return Status::Error;
    }
    if let Some(Command::Run {
        sample: Some(n), ..
    }) = &args.command
    {
        engine.set_sample(Some(crate::contract::Sample::First(*n as usize)));
    }
    let mut print = PrintOptions {
        format: args.format,
        quiet: args.quiet,
        timing: false,
        output: args.output,
    };
    let mut status = Status::Ok;
    for (i, sql) in args.commands.iter().enumerate() {
        let name = if args.commands.len() == 1 {
            "<command>".to_string()
        } else {
            format!("<command {}>", i + 1)
        };
        let mode = match &args.command {
            Some(Command::Run { dry_run: true, .. }) => crate::Mode::DryRun,
            _ => crate::Mode::Run,
        };
        status = worst(
            status,
            exec::run_source(&engine, &name, sql, &print, mode).await,
        );
        if status == Status::Error {
            return status;
        }
    }
    match args.command {
        Some(Command::Run { paths, dry_run, .. }) => {
            let mode = if dry_run {
                crate::Mode::DryRun
            } else {
                crate::Mode::Run
            };
            worst(status, exec::run_paths(&engine, &paths, &print, mode).await)
        }
        Some(Command::Check { paths }) => worst(
            status,
            exec::check_paths(&engine, &paths, args.output).await,
        ),
        Some(Command::Serve {
            paths,
            listen,
            max_concurrent_syncs,
            api_token_file,
            shutdown_grace,
            public_url,
        }) => {
            let config = match serve_config(
                listen,
                max_concurrent_syncs,
                api_token_file,
                &shutdown_grace,
                public_url,
            ) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Status::Error;
                }
            };
            // A reload makes a new session configured as this one.
            drop(engine);
            let new_engine: crate::serve::NewEngine = Arc::new(move || {
                let mut engine = crate::Engine::new()?;
                engine.set_state_location(&state)?;
                Ok(engine)
            });
            match crate::serve::serve(new_engine, &paths, config).await {
                Ok(()) => status,
                Err(e) => {
                    eprintln!("error: {e}");
                    Status::Error
                }
            }
        }
        None if args.commands.is_empty() => match exec::repl(&engine, &mut print).await {
            Ok(()) => Status::Ok,
            Err(e) => {
                eprintln!("error: {e}");
                Status::Error
            }
        },
        None | Some(Command::Init { .. } | Command::Completions { .. } | Command::Docs { .. }) => {
            status
        }
    }
}

/// `sluice serve`'s settings from its arguments and the environment.
fn serve_config(
    listen: std::net::SocketAddr,
    max_concurrent_syncs: Option<u64>,
    api_token_file: Option<PathBuf>,
    shutdown_grace: &str,
    public_url: Option<String>,
) -> std::result::Result<crate::serve::ServeConfig, String> {
    let api_token = match api_token_file {
        Some(file) => Some(
            std::fs::read_to_string(&file)
                .map_err(|e| format!("--api-token-file {}: cannot read: {e}", file.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("SLUICE_API_TOKEN").ok(),
    }
    .filter(|t| !t.is_empty());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(crate::serve::ServeConfig {
        listen,
        max_concurrent_syncs: max_concurrent_syncs.map_or(cores, |n| n as usize),
        api_token,
        shutdown_grace: crate::options::parse_duration(shutdown_grace)
            .map_err(|e| format!("--shutdown-grace '{shutdown_grace}': {e}"))?,
        public_url,
    })
}

fn worst(a: Status, b: Status) -> Status {
    match (a, b) {
        (Status::Error, _) | (_, Status::Error) => Status::Error,
        (Status::Rejected, _) | (_, Status::Rejected) => Status::Rejected,
        _ => Status::Ok,
    }
}

/// Logs go to stderr; `SLUICE_LOG` sets the filter (e.g. `SLUICE_LOG=debug`). By default:
/// warnings, and sluice's own progress lines (long deliveries when stderr is not a terminal).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sluice=info"))
        // tokio-postgres logs every statement's parameters (record values) at debug.
        .add_directive("tokio_postgres=info".parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        // Each line: timestamp, level, message, fields, and the run's span (sync, run_id).
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
