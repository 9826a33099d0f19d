//! Work that must be done before the process exits, though it was started from a `Drop` (which
//! cannot wait): releasing a cancelled run's lock, recording it as interrupted. A task spawned
//! and forgotten often never runs, because the binary returns from `main` first, and a lock left
//! in a shared state store stops every other machine from running the sync.
//!
//! [`spawn`] starts such work and remembers it; the binary calls [`settle`] before it exits.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinHandle;

static PENDING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

/// Starts `work` on the current runtime and remembers it for [`settle`]; without a runtime (a
/// drop after the runtime ended) there is nothing to run it on, and it is dropped.
pub fn spawn(work: impl Future<Output = ()> + Send + 'static) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        let task = handle.spawn(work);
        let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|t| !t.is_finished());
        pending.push(task);
    }
}

/// Waits, at most `limit`, until the work started by [`spawn`] is done, including work that the
/// drop of a cancelled statement starts while this waits (its tasks stop asynchronously).
pub async fn settle(limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut quiet = 0;
    while quiet < 3 && tokio::time::Instant::now() < deadline {
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *PENDING.lock().unwrap_or_else(|e| e.into_inner()));
        if tasks.is_empty() {
            quiet += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        quiet = 0;
        for task in tasks {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
    }
}
