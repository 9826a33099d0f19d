//! Work that must be done before the process exits, though it was started from a `Drop` (which
//! cannot wait): releasing a cancelled run's lock, recording it as interrupted. A task spawned
//! and forgotten often never runs, because the binary returns from `main` first, and a lock left
//! in a shared state store stops every other machine from running the sync.
//!
//! [`spawn`] starts such work and remembers it; every held lock counts itself with a [`Held`];
//! the binary calls [`settle`] before it exits.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;

static PENDING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());
static HELD: AtomicUsize = AtomicUsize::new(0);

/// Counts one lock this process holds, from when it is taken until its file is deleted.
#[derive(Debug)]
pub struct Held(());

impl Held {
    pub fn new() -> Self {
        HELD.fetch_add(1, Ordering::SeqCst);
        Held(())
    }
}

impl Default for Held {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.fetch_sub(1, Ordering::SeqCst);
    }
}

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

/// Waits, at most `limit`, until the work started by [`spawn`] is done and no lock is held any
/// more: a statement cancelled just before drops its run (and starts that work) only when its
/// tasks stop, asynchronously. Returns at once when there is nothing to wait for.
pub async fn settle(limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *PENDING.lock().unwrap_or_else(|e| e.into_inner()));
        let idle = tasks.is_empty() && HELD.load(Ordering::SeqCst) == 0;
        if idle || tokio::time::Instant::now() >= deadline {
            return;
        }
        for task in tasks {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
