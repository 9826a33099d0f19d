//! `sluice init [DIR] --with hubspot,postgres`: a new project that `sluice check`, `sluice run
//! --dry-run` and `sluice run` work on as written, once the environment variables its
//! connections name are set.

use std::path::{Path, PathBuf};

use super::Status;

/// How one connection type appears in a new project.
struct Starter {
    kind: &'static str,
    /// The `CREATE CONNECTION` statement, secrets and addresses as `env()` placeholders.
    connection: &'static str,
    /// The variables it reads, with what to put in them.
    env: &'static [(&'static str, &'static str)],
    /// The example sync's body into this destination, or `None` for a source only.
    sync: Option<(&'static str, &'static str)>,
}

const STARTERS: &[Starter] = &[
    Starter {
        kind: "webhook",
        connection: "CREATE OR REPLACE CONNECTION hook TYPE webhook OPTIONS (\n  url env('WEBHOOK_URL'),\n  key 'email',\n  rate_limit '10'\n);",
        env: &[("WEBHOOK_URL", "the endpoint records are POSTed to")],
        sync: Some((
            "customers_to_hook",
            "MERGE INTO hook.customers AS t USING customers AS s ON t.email = s.email\nWHEN MATCHED THEN UPDATE SET name = s.name, plan = s.plan\nWHEN NOT MATCHED THEN INSERT (email, name, plan) VALUES (s.email, s.name, s.plan)\nWHEN NOT MATCHED BY SOURCE THEN DELETE",
        )),
    },
    Starter {
        kind: "hubspot",
        connection: "CREATE OR REPLACE CONNECTION crm TYPE hubspot OPTIONS (token env('HUBSPOT_TOKEN'));",
        env: &[(
            "HUBSPOT_TOKEN",
            "a private app token with CRM object scopes",
        )],
        sync: Some((
            "customers_to_hubspot",
            "INSERT INTO crm.contacts SELECT email, name AS firstname FROM customers",
        )),
    },
    Starter {
        kind: "salesforce",
        connection: "CREATE OR REPLACE CONNECTION sf TYPE salesforce OPTIONS (\n  login_url env('SALESFORCE_LOGIN_URL'),\n  client_id env('SALESFORCE_CLIENT_ID'),\n  client_secret env('SALESFORCE_CLIENT_SECRET')\n);",
        env: &[
            ("SALESFORCE_LOGIN_URL", "your org's My Domain URL"),
            ("SALESFORCE_CLIENT_ID", "the connected app's consumer key"),
            (
                "SALESFORCE_CLIENT_SECRET",
                "the connected app's consumer secret",
            ),
        ],
        sync: Some((
            "customers_to_salesforce",
            "INSERT INTO sf.Contact SELECT email AS Email, name AS LastName FROM customers",
        )),
    },
    Starter {
        kind: "file",
        connection: "CREATE OR REPLACE CONNECTION out TYPE file OPTIONS (url 'out/', format 'jsonl');",
        env: &[],
        sync: Some((
            "customers_to_files",
            "INSERT INTO out.customers SELECT email, name, plan FROM customers",
        )),
    },
    Starter {
        kind: "postgres",
        connection: "-- Models can read its tables as wh.<table> (schema public) or wh.<schema>.<table>.\nCREATE OR REPLACE CONNECTION wh TYPE postgres OPTIONS (url env('WAREHOUSE_URL'));",
        env: &[(
            "WAREHOUSE_URL",
            "postgres://user:password@host:5432/database",
        )],
        sync: None,
    },
    Starter {
        kind: "slack",
        connection: "-- Alert notices (CREATE ALERT … NOTIFY ops), and ops.messages: one message per new row.\nCREATE OR REPLACE CONNECTION ops TYPE slack OPTIONS (webhook_url env('SLACK_WEBHOOK_URL'));\nCREATE OR REPLACE ALERT failing ON SYNC '*' WHEN status = 'failed' NOTIFY ops;",
        env: &[(
            "SLACK_WEBHOOK_URL",
            "an incoming webhook URL (https://hooks.slack.com/services/…)",
        )],
        sync: None,
    },
];

/// The bundled sample model: a few customers, so the example sync has rows on day one.
const SAMPLE: &str = "email,name,plan
ada@example.com,Ada,pro
grace@example.com,Grace,team
alan@example.com,Alan,free
edsger@example.com,Edsger,pro
barbara@example.com,Barbara,team
";

/// The files of a project declaring `kinds`, as (path, contents).
fn project(kinds: &[String]) -> Result<Vec<(PathBuf, String)>, String> {
    let mut chosen: Vec<&Starter> = vec![];
    for kind in kinds {
        let kind = kind.trim().to_lowercase();
        let starter = STARTERS.iter().find(|s| s.kind == kind).ok_or_else(|| {
            format!(
                "sluice init: unknown connection type '{kind}'; choose from {}",
                STARTERS
                    .iter()
                    .map(|s| s.kind)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        if !chosen.iter().any(|c| c.kind == starter.kind) {
            chosen.push(starter);
        }
    }
    if chosen.is_empty() {
        return Err("sluice init: --with needs at least one connection type".into());
    }
    // The example sync goes into the first destination chosen (files when only a source is).
    let file = STARTERS.iter().find(|s| s.kind == "file").expect("file");
    if chosen.iter().all(|s| s.sync.is_none()) {
        chosen.push(file);
    }
    let target = chosen
        .iter()
        .find(|s| s.sync.is_some())
        .expect("a destination");
    let (sync, body) = target.sync.expect("a sync");

    let mut connections = String::from(
        "-- Connections. Secrets and addresses come from the environment (env('VAR')), never from\n\
         -- this file; SHOW CONNECTION TYPES and DESCRIBE CONNECTION TYPE <type> list every option.\n",
    );
    for starter in &chosen {
        connections.push('\n');
        for (var, what) in starter.env {
            connections.push_str(&format!("-- {var}: {what}\n"));
        }
        connections.push_str(starter.connection);
        connections.push('\n');
    }
    let models = "-- Models: any query over files, databases and other connections. This one reads the\n\
                  -- bundled sample; point it at your warehouse when you are ready.\n\
                  CREATE OR REPLACE EXTERNAL TABLE customers STORED AS CSV LOCATION 'data/customers.csv'\n  \
                  OPTIONS ('format.has_header' 'true');\n"
        .to_string();
    let syncs = format!(
        "-- Syncs. Each run sends only what changed since the last one (state lives in .sluice/).\n\
         CREATE OR REPLACE SYNC {sync} AS\n{body};\n\nRUN SYNC {sync};\n"
    );
    let vars: Vec<String> = chosen
        .iter()
        .flat_map(|s| s.env.iter())
        .map(|(var, what)| format!("export {var}=...   # {what}"))
        .collect();
    let readme = format!(
        "# A sluice project\n\n\
         Files run in name order in one session: `connections.sql`, `models.sql`, `syncs.sql`.\n\n\
         ```sh\n{}\
         sluice check .            # parse and plan everything; sends nothing\n\
         sluice run --dry-run .    # what each sync would insert, update and delete\n\
         sluice run .              # run it\n\
         ```\n\n\
         Run history: `sluice -c \"SELECT * FROM sluice.runs\"`; rejected records: `sluice.rejects`.\n",
        if vars.is_empty() {
            String::new()
        } else {
            format!("{}\n", vars.join("\n"))
        }
    );
    Ok(vec![
        ("connections.sql".into(), connections),
        ("models.sql".into(), models),
        ("syncs.sql".into(), syncs),
        ("data/customers.csv".into(), SAMPLE.to_string()),
        (".gitignore".into(), ".sluice/\nout/\n".to_string()),
        ("README.md".into(), readme),
    ])
}

/// Writes the project under `dir`. Files already there with the same contents are left as they
/// are (running init twice changes nothing); any other file in the way stops it before it
/// writes anything.
pub fn init(dir: &Path, kinds: &[String]) -> Status {
    let files = match project(kinds) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("{e}");
            return Status::Error;
        }
    };
    let mut in_the_way = vec![];
    let mut to_write = vec![];
    for (path, contents) in &files {
        let full = dir.join(path);
        match std::fs::read_to_string(&full) {
            Ok(existing) if existing == *contents => {}
            Ok(_) => in_the_way.push(full.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => to_write.push((full, contents)),
            Err(e) => {
                eprintln!("sluice init: cannot read {}: {e}", full.display());
                return Status::Error;
            }
        }
    }
    if !in_the_way.is_empty() {
        eprintln!(
            "sluice init: these files exist and differ from what init writes; nothing was written (move them, or init another folder):\n  {}",
            in_the_way.join("\n  ")
        );
        return Status::Error;
    }
    for (path, contents) in &to_write {
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(path, contents));
        if let Err(e) = written {
            eprintln!("sluice init: cannot write {}: {e}", path.display());
            return Status::Error;
        }
        println!("wrote {}", path.display());
    }
    if to_write.is_empty() {
        println!(
            "{} already holds this project; nothing changed",
            dir.display()
        );
    } else {
        println!(
            "next: cd {} and read README.md (check, dry-run, run)",
            dir.display()
        );
    }
    Status::Ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_starter_is_a_known_connection_type() {
        let kinds: Vec<&str> = crate::connectors::kinds()
            .iter()
            .map(|k| k.kind())
            .collect();
        for starter in STARTERS {
            assert!(kinds.contains(&starter.kind), "{}", starter.kind);
        }
        assert_eq!(
            STARTERS.len(),
            kinds.len(),
            "a connection type has no starter"
        );
    }

    #[test]
    fn a_source_only_project_syncs_into_files() {
        let files = project(&["postgres".into()]).unwrap();
        let connections = &files[0].1;
        assert!(connections.contains("TYPE postgres") && connections.contains("TYPE file"));
        assert!(files[2].1.contains("INSERT INTO out.customers"));
        assert!(
            project(&["hubspott".into()])
                .unwrap_err()
                .contains("hubspot")
        );
    }

    #[test]
    fn init_refuses_to_overwrite_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let kinds = vec!["webhook".to_string(), "hubspot".to_string()];
        assert_eq!(init(dir.path(), &kinds), Status::Ok);
        let before = std::fs::read_to_string(dir.path().join("syncs.sql")).unwrap();
        assert!(before.contains("MERGE INTO hook.customers"));
        assert_eq!(init(dir.path(), &kinds), Status::Ok);
        std::fs::write(dir.path().join("models.sql"), "-- mine").unwrap();
        std::fs::remove_file(dir.path().join("README.md")).unwrap();
        assert_eq!(init(dir.path(), &kinds), Status::Error);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("models.sql")).unwrap(),
            "-- mine"
        );
        assert!(
            !dir.path().join("README.md").exists(),
            "wrote despite a conflict"
        );
    }
}
