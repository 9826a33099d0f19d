//! `Tx`: a pooled connection inside a transaction that spans several statements (and, in a
//! streaming first run, the whole run). It ends by [`Tx::commit`] or [`Tx::rollback`]; dropped
//! any other way (the run cancelled by Ctrl-C, a future dropped by library code, an error that
//! returned early) it takes the connection out of the pool and closes it, so the server rolls the
//! transaction back and no later statement can run, or COMMIT, inside it.
//!
//! The pool checks the other way too: a connection is recycled only if it is idle, outside any
//! transaction ([`IDLE_CHECK`]).

use std::ops::Deref;

use deadpool_postgres::Object;

/// The pool's recycling query: fails inside a transaction block, whose `now()` is the block's
/// start while `statement_timestamp()` is this statement's (the two are equal in the first
/// statement of a transaction), and inside a failed one (every statement fails there). A
/// connection that fails it is closed and replaced.
pub const IDLE_CHECK: &str = "SELECT 1 / (now() = statement_timestamp())::int";

/// A pooled connection in an open transaction.
pub struct Tx {
    client: Option<Object>,
}

impl Tx {
    /// Begins a transaction on `client`.
    pub async fn begin(client: Object) -> Result<Self, tokio_postgres::Error> {
        // Guarded before BEGIN is sent: a cancel while it is in flight closes the connection too.
        let tx = Self {
            client: Some(client),
        };
        tx.batch_execute("BEGIN").await?;
        Ok(tx)
    }

    /// Commits; the connection goes back to the pool. If COMMIT fails, the connection is closed.
    pub async fn commit(mut self) -> Result<(), tokio_postgres::Error> {
        let result = self.batch_execute("COMMIT").await;
        if result.is_ok() {
            drop(self.client.take());
        }
        result
    }

    /// Rolls back; the connection goes back to the pool. If ROLLBACK fails, it is closed.
    pub async fn rollback(mut self) {
        if self.batch_execute("ROLLBACK").await.is_ok() {
            drop(self.client.take());
        }
    }
}

impl Deref for Tx {
    type Target = Object;

    fn deref(&self) -> &Object {
        self.client
            .as_ref()
            .expect("a Tx holds its client until it ends")
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            tracing::debug!("Postgres: a transaction was abandoned; its connection is closed.");
            // Out of the pool: dropping the client ends the connection, and the server rolls
            // the transaction back.
            drop(Object::take(client));
        }
    }
}
