//! What `sluice serve` watches in Postgres: a table's change counters (`pg_stat_user_tables`)
//! or a sync's `change_query` for `SCHEDULE ON CHANGE`, and a `LISTEN` channel for
//! `SCHEDULE ON NOTIFY`.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Socket};

use super::config::Tls;
use super::metadata::quote_ident;
use super::{PgConnection, pg_message};
use crate::error::{Error, Result};
use crate::watch::ChangeProbe;

/// A table's inserted, updated and deleted tuple counts (and its partitions'), with its file
/// node, which a TRUNCATE changes. The counters move within about a second of a commit.
#[derive(Debug)]
pub struct CountersProbe {
    pub connection: Arc<PgConnection>,
    /// `"schema"."name"`.
    pub relation: String,
    /// How the model names it, for messages.
    pub table: String,
}

/// `to_regclass` takes the name as text, bound, never pasted into the SQL. (`pg_partition_tree`
/// lists a partitioned table's partitions, and nothing for a plain table.)
const COUNTERS: &str = "SELECT count(*)::text || ':' \
     || coalesce(sum(s.n_tup_ins + s.n_tup_upd + s.n_tup_del), 0)::text || ':' \
     || coalesce(string_agg(pg_relation_filenode(s.relid)::text, ',' ORDER BY s.relid), '') \
     FROM pg_stat_user_tables s \
     WHERE s.relid = to_regclass($1) \
        OR s.relid IN (SELECT relid FROM pg_partition_tree(to_regclass($1)))";

#[async_trait]
impl ChangeProbe for CountersProbe {
    fn describe(&self) -> String {
        format!("{} (pg_stat_user_tables)", self.table)
    }

    async fn fingerprint(&self) -> Result<String> {
        let client = self.connection.client().await?;
        let row = client
            .query_one(COUNTERS, &[&self.relation])
            .await
            .map_err(|e| self.connection.error(e))?;
        let fingerprint: String = row.get(0);
        if fingerprint.starts_with("0:") {
            return Err(Error::Write {
                message: format!(
                    "ON CHANGE: Postgres keeps no change counters for {} (connection {}); set the sync's change_query option, e.g. 'SELECT max(updated_at) FROM …'",
                    self.table, self.connection.name
                ),
            });
        }
        Ok(fingerprint)
    }
}

/// The answer of a sync's `change_query`, run in the database as written.
#[derive(Debug)]
pub struct QueryProbe {
    pub connection: Arc<PgConnection>,
    pub query: String,
}

/// At most this much of a change query's answer is kept (a query meant to be cheap that
/// answers more is cut off, not buffered whole).
const MAX_ANSWER: usize = 64 * 1024;

#[async_trait]
impl ChangeProbe for QueryProbe {
    fn describe(&self) -> String {
        format!("change_query on connection {}", self.connection.name)
    }

    async fn fingerprint(&self) -> Result<String> {
        let client = self.connection.client().await?;
        let messages = client
            .simple_query(&self.query)
            .await
            .map_err(|e| Error::Write {
                message: format!(
                    "change_query on connection {}: {}; fix the sync's change_query option",
                    self.connection.name,
                    pg_message(&e)
                ),
            })?;
        let mut answer = String::new();
        for message in messages {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                for i in 0..row.len() {
                    answer.push_str(row.get(i).unwrap_or("\u{0}"));
                    answer.push('\u{1}');
                }
                answer.push('\n');
                if answer.len() > MAX_ANSWER {
                    break;
                }
            }
        }
        Ok(answer)
    }
}

/// The payloads of NOTIFY on `channel`, from a connection of its own (a pooled one cannot
/// listen). The stream ends when that connection is lost.
pub async fn listen(
    connection: &PgConnection,
    channel: &str,
) -> Result<BoxStream<'static, String>> {
    let config = &connection.config;
    let listened = match config.tls {
        Tls::Disable => listen_with(&config.pg, tokio_postgres::NoTls, channel).await,
        _ => listen_with(&config.pg, config.tls_connector()?, channel).await,
    };
    listened.map_err(|e| Error::Write {
        message: format!(
            "ON NOTIFY '{channel}': cannot listen on Postgres at {} (connection {}): {}",
            config.describe(),
            connection.name,
            pg_message(&e)
        ),
    })
}

async fn listen_with<T>(
    pg: &tokio_postgres::Config,
    tls: T,
    channel: &str,
) -> std::result::Result<BoxStream<'static, String>, tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket> + Send,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, mut connection) = pg.connect(tls).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let wanted = channel.to_string();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message
                && n.channel() == wanted
                && tx.send(n.payload().to_string()).is_err()
            {
                break;
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {}", quote_ident(channel)))
        .await?;
    // The client lives as long as the stream: dropping it closes the connection.
    Ok(
        futures::stream::unfold((rx, client), |(mut rx, client)| async move {
            rx.recv().await.map(|payload| (payload, (rx, client)))
        })
        .boxed(),
    )
}
