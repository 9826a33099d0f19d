//! The REPL driven for real through a pseudo-terminal: multi-line input, errors that do not end
//! the session, backslash commands, completion, persistent history and Ctrl-C.

use std::path::Path;
use std::process::Command;

use rexpect::session::PtySession;

const TIMEOUT_MS: u64 = 60_000;

fn spawn(dir: &Path) -> PtySession {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.current_dir(dir)
        .env("SLUICE_HISTORY", dir.join("history.txt"))
        .env("TERM", "xterm")
        .env_remove("SLUICE_LOG");
    let mut session = rexpect::session::spawn_command(cmd, Some(TIMEOUT_MS)).expect("spawn sluice");
    session.exp_string("\\? for help").expect("banner");
    session
}

/// Waits for the prompt, then types `keys` (rexpect's `send` buffers, so flush).
fn type_at_prompt(s: &mut PtySession, keys: &str) {
    s.exp_string("sluice> ").expect("prompt");
    s.send(keys).unwrap();
    s.flush().unwrap();
}

fn line(s: &mut PtySession, text: &str) {
    type_at_prompt(s, &format!("{text}\r"));
}

fn quit(mut session: PtySession) {
    line(&mut session, "\\q");
    session.exp_eof().expect("REPL exits on \\q");
}

#[test]
fn multi_line_statements_errors_and_commands() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spawn(dir.path());

    // A statement continues until ';'.
    line(&mut s, "SELECT 40 +");
    s.send_line("  2 AS answer;").unwrap();
    s.exp_string("| 42     |").unwrap();

    // An error prints and the session carries on.
    line(&mut s, "SELECT nope;");
    s.exp_string("No field named nope").unwrap();
    line(&mut s, "SELECT 'still here' AS status;");
    s.exp_string("| still here |").unwrap();

    // \d lists connections, \d NAME describes an object.
    line(
        &mut s,
        "CREATE CONNECTION out TYPE file OPTIONS (url 'out/');",
    );
    s.exp_string("CREATE CONNECTION out (type file)").unwrap();
    line(
        &mut s,
        "INSERT INTO out.people SELECT 'ada' AS person_name, 36 AS age;",
    );
    s.exp_string("wrote 1 row").unwrap();
    line(&mut s, "\\d");
    s.exp_string("url 'out/'").unwrap();
    line(&mut s, "\\d out.people");
    s.exp_string("person_name").unwrap();

    // \format and \timing.
    line(&mut s, "\\format csv");
    s.exp_string("Output format is Csv.").unwrap();
    line(&mut s, "SELECT 'a' AS x, 'b' AS y;");
    s.exp_string("x,y").unwrap();
    line(&mut s, "\\timing");
    s.exp_string("Timing is on.").unwrap();
    line(&mut s, "SELECT 1 AS one;");
    s.exp_string("Time: ").unwrap();

    // Tab completes columns of known objects.
    type_at_prompt(&mut s, "SELECT person_na\t");
    s.send(" FROM out.people;\r").unwrap();
    s.flush().unwrap();
    s.exp_string("person_name\r\nada").unwrap();

    line(&mut s, "\\nonsense");
    s.exp_string("unknown command").unwrap();
    quit(s);
}

#[test]
fn history_persists_across_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spawn(dir.path());
    line(&mut s, "SELECT 'remember me' AS memo;");
    s.exp_string("| remember me |").unwrap();
    quit(s);
    let history = std::fs::read_to_string(dir.path().join("history.txt")).unwrap();
    assert!(
        history.contains("SELECT 'remember me' AS memo;"),
        "{history}"
    );

    let mut s = spawn(dir.path());
    // Up, Up: past the previous session's `\q` to its last statement.
    type_at_prompt(&mut s, "\x1b[A\x1b[A");
    s.send("\r").unwrap();
    s.flush().unwrap();
    s.exp_string("| remember me |").unwrap();
    quit(s);
}

#[test]
fn ctrl_c_cancels_the_statement_not_the_repl() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spawn(dir.path());
    line(&mut s, "SELECT count(*) FROM range(100000000000) a;");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    s.send_control('c').unwrap();
    s.exp_string("Cancelled.").unwrap();
    line(&mut s, "SELECT 'alive' AS after_cancel;");
    s.exp_string("| alive ").unwrap();
    // Ctrl-C at the prompt clears the line and keeps the session.
    type_at_prompt(&mut s, "SELECT 'half typed");
    s.send_control('c').unwrap();
    s.exp_string("\\q to quit").unwrap();
    quit(s);
}
