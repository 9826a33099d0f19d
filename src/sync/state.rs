//! Durable sync state in any object store: snapshots, manifests, rejects, run records and locks.
//!
//! ```text
//! <state>/syncs/<sync>/manifest.json          which snapshot and rejects are committed
//! <state>/syncs/<sync>/snapshot-<run>.arrow   key, record id and row hash per record
//! <state>/syncs/<sync>/snapshot-<run>.h<n>.arrow  the hashes of mapped field n, per record
//! <state>/syncs/<sync>/rejects-<run>.jsonl    records the destination refused, until they succeed
//! <state>/syncs/<sync>/lock                   held while a run of the sync is in progress
//! <state>/runs/<sync>/<started>-<run>.json    one record per run
//! <state>/changes/<sync>/<run>.arrow          what the run sent, per record (`sluice.changes`)
//! <state>/changes/<sync>/<run>.outcomes.arrow what the destination answered, per record
//! ```
//!
//! Commit = write the new snapshot and rejects under new names, then replace the manifest in one
//! `put` (atomic on every object store: a local put renames a finished temporary file). A crash
//! before the manifest swap leaves the previous manifest and the files it names untouched.
//!
//! Every file is checked when read (format 3): snapshot, hash, rejects and intent files end with
//! a seal (8 magic bytes and the xxh3-64 of what precedes them), and the manifest carries the
//! hash of its own text. A flipped byte anywhere is a "corrupt state" error that names the file,
//! never a wrong diff (a phantom DELETE) or a panic.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use datafusion::arrow::array::{Array, ArrayRef, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::writer::FileWriter;
use datafusion::arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::hash::{HASH_VERSION, POSTGRES_HASH_VERSION};
use super::snapshot::{FieldHashes, HashStore, Snapshot};
use crate::error::{Error, Result};

/// The manifest format this version writes. Format 1 kept every field's hashes in the snapshot
/// file itself; it is still read (its row hashes are computed on load). Format 2's files have no
/// seals and its manifest no checksum; they are still read, unchecked.
pub const FORMAT: u32 = 3;

/// The first format whose files are sealed and whose manifest has a checksum.
const SEALED_FORMAT: u32 = 3;

/// The magic bytes of a state file's seal, followed by the xxh3-64 (little-endian) of the bytes
/// before the seal.
const SEAL: &[u8; 8] = b"SLUICE\x00\x01";

/// Where state lives.
#[derive(Debug, Clone)]
pub struct StateStore {
    store: Arc<dyn ObjectStore>,
    /// The same store when it is the local file system: files are then mapped, not copied.
    local: Option<Arc<LocalFileSystem>>,
    root: Path,
    /// The location as the user gave it (for messages; never holds credentials).
    display: String,
}

/// Which snapshot and rejects are committed for a sync.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub hash: String,
    pub sync: String,
    pub target: String,
    pub key: Option<String>,
    pub fields: Vec<String>,
    pub snapshot: String,
    /// The files of the snapshot's field hashes, one per field of `fields` (format 2).
    #[serde(default)]
    pub hash_files: Vec<String>,
    pub rows: u64,
    pub rejects: Option<String>,
    pub run_id: String,
    pub committed_at: String,
    /// The xxh3-64 of this manifest as written with `checksum` null (format 3).
    #[serde(default)]
    pub checksum: Option<String>,
}

impl Manifest {
    /// The files it names: the snapshot, its hash files and the rejects.
    pub fn files(&self) -> impl Iterator<Item = &String> {
        [Some(&self.snapshot), self.rejects.as_ref()]
            .into_iter()
            .flatten()
            .chain(&self.hash_files)
    }

    /// The manifest as written: pretty JSON carrying the hash of its own text.
    fn sealed(&self) -> Vec<u8> {
        let manifest = Manifest {
            checksum: Some(self.own_checksum()),
            ..self.clone()
        };
        serde_json::to_vec_pretty(&manifest).expect("serializing to memory")
    }

    /// Whether a manifest read back is the one its checksum was computed for.
    fn intact(&self) -> bool {
        self.checksum.as_ref() == Some(&self.own_checksum())
    }

    /// The xxh3-64 of this manifest's text with `checksum` null.
    fn own_checksum(&self) -> String {
        let manifest = Manifest {
            checksum: None,
            ..self.clone()
        };
        let body = serde_json::to_vec_pretty(&manifest).expect("serializing to memory");
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&body))
    }
}

/// `body` with its seal appended.
fn seal(mut body: Vec<u8>) -> Bytes {
    let hash = xxhash_rust::xxh3::xxh3_64(&body);
    body.extend_from_slice(SEAL);
    body.extend_from_slice(&hash.to_le_bytes());
    Bytes::from(body)
}

/// The body of a sealed file, checked against its seal. A file without a seal is returned as it
/// is unless `required` (files of format 2 and before have none); whatever reads it then checks
/// its structure, and a sealed file whose magic bytes were damaged fails that check.
fn unseal(bytes: Bytes, required: bool) -> std::result::Result<Bytes, String> {
    let n = bytes.len();
    if n >= 16 && &bytes[n - 16..n - 8] == SEAL {
        let stored = u64::from_le_bytes(bytes[n - 8..].try_into().expect("8 bytes"));
        let body = bytes.slice(..n - 16);
        return match xxhash_rust::xxh3::xxh3_64(&body) == stored {
            true => Ok(body),
            false => {
                Err("is corrupt (it does not match its checksum: a byte of it changed)".into())
            }
        };
    }
    match required {
        true => Err("is corrupt (it has no checksum seal: it was cut short or changed)".into()),
        false => Ok(bytes),
    }
}

/// One rejected record, as kept in state and shown in `sluice.rejects`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RejectEntry {
    pub sync: String,
    pub run_id: String,
    pub target: String,
    pub key: Option<String>,
    pub operation: String,
    pub error_code: String,
    pub error_message: String,
    pub payload: String,
    pub attempts: u32,
    pub first_seen: String,
    pub last_seen: String,
}

/// One run of a sync, as shown in `sluice.runs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    pub sync: String,
    pub target: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// running | succeeded | partial (some records rejected) | failed | interrupted | dry_run |
    /// skipped (`sluice serve`: a sequence stopped before it)
    pub status: String,
    pub rows_read: u64,
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    pub unchanged: u64,
    pub rejected: u64,
    pub requests: u64,
    pub retries: u64,
    /// Requests answered 429 (waited out and retried).
    #[serde(default)]
    pub throttled: u64,
    pub duration_ms: u64,
    pub error: Option<String>,
    /// What the sync may do (`upsert`, `mirror`, …; empty in records of earlier versions).
    #[serde(default)]
    pub mode: String,
    /// The facts of a destination's failure: connection, object, HTTP status, error code, key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<crate::error::Failure>,
}

/// Something an alert did, as shown in `sluice.alerts`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AlertEvent {
    pub event_id: String,
    pub alert: String,
    pub sync: String,
    /// fired | repeated | resolved
    pub event: String,
    /// The run it was evaluated after.
    pub run_id: String,
    /// That run's status.
    pub status: String,
    pub at: String,
    /// The connection notified.
    pub notified: String,
    pub delivered: bool,
    /// Why the notice was not delivered.
    pub error: Option<String>,
    /// The notice's text.
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct LockFile {
    pid: u32,
    host: String,
    run_id: String,
    started_at: String,
}

/// Locks this process holds (a lock file naming this process but not listed here was left by a
/// cancelled statement and is stale).
fn held() -> &'static Mutex<HashSet<String>> {
    static HELD: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    HELD.get_or_init(Mutex::default)
}

/// Holds a sync's lock until [`SyncLock::release`]d (or, failing that, dropped: the lock file
/// is then deleted by a task that [`super::cleanup::settle`] waits for before the process exits).
#[derive(Debug)]
pub struct SyncLock {
    store: Arc<dyn ObjectStore>,
    path: Path,
    /// The run whose process died holding the lock, when this lock was taken over from it.
    pub taken_over: Option<String>,
    /// Counts this lock until its file is deleted (see [`super::cleanup::settle`]).
    held: Option<super::cleanup::Held>,
}

impl SyncLock {
    /// Deletes the lock file, and returns once it is gone (or could not be deleted: a lock this
    /// process left is taken over by its next run).
    pub async fn release(mut self) {
        let counted = self.held.take();
        held().lock().expect("lock set").remove(self.path.as_ref());
        if let Err(e) = self.store.delete(&self.path).await {
            tracing::warn!(lock = %self.path, error = %e, "Could not delete the sync's lock.");
        }
        drop(counted);
    }
}

impl Drop for SyncLock {
    fn drop(&mut self) {
        let Some(counted) = self.held.take() else {
            return; // released
        };
        held().lock().expect("lock set").remove(self.path.as_ref());
        let store = Arc::clone(&self.store);
        let path = self.path.clone();
        super::cleanup::spawn(async move {
            let _ = store.delete(&path).await;
            drop(counted);
        });
    }
}

impl StateStore {
    pub fn new(store: Arc<dyn ObjectStore>, root: Path, display: String) -> Self {
        Self {
            store,
            local: None,
            root,
            display,
        }
    }

    /// A state directory on the local file system (created on first write).
    pub fn local(dir: &std::path::Path) -> Result<Self> {
        let dir = std::path::absolute(dir).map_err(|source| Error::Io {
            context: format!("cannot use {} for sync state", dir.display()),
            source,
        })?;
        let root = Path::from_absolute_path(&dir).map_err(|e| Error::State {
            message: format!("cannot use {} for sync state: {e}", dir.display()),
        })?;
        let local = Arc::new(LocalFileSystem::new());
        Ok(Self {
            local: Some(Arc::clone(&local)),
            ..Self::new(local, root, dir.display().to_string())
        })
    }

    /// State at `location`: a local directory, `file://…`, or any object store URL
    /// (`s3://bucket/prefix`, `gs://…`, `az://…`) the registry can build from the environment.
    pub fn at(
        location: &str,
        registry: &dyn datafusion::execution::object_store::ObjectStoreRegistry,
    ) -> Result<Self> {
        let Ok(url) = url::Url::parse(location) else {
            return Self::local(std::path::Path::new(location));
        };
        if url.scheme() == "file" {
            let path = url.to_file_path().map_err(|_| Error::State {
                message: format!("{location} is not a usable file URL for sync state"),
            })?;
            return Self::local(&path);
        }
        if url.scheme().len() == 1 {
            // A Windows drive letter, not a scheme.
            return Self::local(std::path::Path::new(location));
        }
        let store = registry.get_store(&url).map_err(|e| Error::State {
            message: format!(
                "cannot use {} for sync state: {e}",
                crate::options::redact_url_password(location)
            ),
        })?;
        let root = Path::from_url_path(url.path()).map_err(|e| Error::State {
            message: format!("cannot use {location} for sync state: {e}"),
        })?;
        Ok(Self::new(
            store,
            root,
            crate::options::redact_url_password(location),
        ))
    }

    pub fn display(&self) -> &str {
        &self.display
    }

    pub(super) fn path(&self, parts: &[&str]) -> Path {
        let mut p = self.root.clone();
        for part in parts {
            p = p.join(*part);
        }
        p
    }

    pub(super) fn shown(&self, path: &Path) -> String {
        let relative = path
            .as_ref()
            .strip_prefix(self.root.as_ref())
            .unwrap_or(path.as_ref())
            .trim_start_matches('/');
        format!("{}/{relative}", self.display.trim_end_matches('/'))
    }

    pub(super) fn io(&self, path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
        Error::State {
            message: format!("cannot {what} {}: {e}", self.shown(path)),
        }
    }

    /// An object's bytes; `None` if it does not exist.
    pub(super) async fn read(&self, path: &Path) -> Result<Option<Bytes>> {
        if let Some(local) = &self.local {
            return self.map_local(local, path).await;
        }
        match self.store.get(path).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| self.io(path, "read", e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.io(path, "read", e)),
        }
    }

    /// A local file's bytes, mapped rather than read: a snapshot's files are hundreds of MB, and
    /// mapping them costs neither a copy nor fresh zeroed memory. Sound because state files are
    /// never changed once written (a put writes a new file and renames it into place, and
    /// deleting a file leaves an existing mapping intact).
    async fn map_local(&self, local: &LocalFileSystem, path: &Path) -> Result<Option<Bytes>> {
        let file = local
            .path_to_filesystem(path)
            .map_err(|e| self.io(path, "read", e))?;
        // (Opening and populating the mapping reads the disk: off the async workers.)
        let mapped = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Bytes>> {
            let file = match std::fs::File::open(&file) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            if file.metadata()?.len() == 0 {
                return Ok(Some(Bytes::new()));
            }
            // SAFETY: see above; the file is not modified while the mapping lives.
            let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }?;
            Ok(Some(Bytes::from_owner(map)))
        })
        .await
        .map_err(|e| self.io(path, "read", e))?;
        mapped.map_err(|e| self.io(path, "read", e))
    }

    pub(super) async fn write(&self, path: &Path, bytes: impl Into<PutPayload>) -> Result<()> {
        if let Some(local) = &self.local {
            let file = local
                .path_to_filesystem(path)
                .map_err(|e| self.io(path, "write", e))?;
            let payload: PutPayload = bytes.into();
            return tokio::task::spawn_blocking(move || write_private(&file, &payload))
                .await
                .map_err(|e| self.io(path, "write", e))?
                .map_err(|e| self.io(path, "write", e));
        }
        self.store
            .put(path, bytes.into())
            .await
            .map_err(|e| self.io(path, "write", e))?;
        Ok(())
    }

    /// The object store itself (for the change log's uploads and deletes).
    pub(super) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Where `path` is on the local file system, if the state is local.
    pub(super) fn local_file(&self, path: &Path) -> Option<std::path::PathBuf> {
        self.local.as_ref()?.path_to_filesystem(path).ok()
    }

    /// Writes one batch as a sealed Arrow file.
    pub(super) async fn put_arrow(&self, path: &Path, batch: &RecordBatch) -> Result<()> {
        self.write(path, ipc_file(batch)?).await
    }

    /// A sealed Arrow file's batches; `None` if it does not exist.
    pub(super) async fn get_arrow(&self, path: &Path) -> Result<Option<Vec<RecordBatch>>> {
        let Some(bytes) = self.read(path).await? else {
            return Ok(None);
        };
        let batches = unseal(bytes, true)
            .and_then(|body| read_ipc(body).map_err(|e| e.to_string()))
            .map_err(|e| self.io(path, "read", e))?;
        Ok(Some(batches.1))
    }

    /// Every object under `prefix`.
    pub(super) async fn list(&self, prefix: &Path) -> Result<Vec<object_store::ObjectMeta>> {
        self.store
            .list(Some(prefix))
            .try_collect()
            .await
            .map_err(|e| self.io(prefix, "list", e))
    }

    /// The committed manifest of `sync`; `None` before its first commit.
    pub async fn manifest(&self, sync: &str) -> Result<Option<Manifest>> {
        let path = self.path(&["syncs", sync, "manifest.json"]);
        let Some(bytes) = self.read(&path).await? else {
            return Ok(None);
        };
        let corrupt = |e: String| Error::State {
            message: format!(
                "the state manifest {} is corrupt ({e}); nothing was sent. Restore it, or RESET SYNC {sync} to forget this sync's state (its next run resends every record)",
                self.shown(&path)
            ),
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        // The version first: a later format may carry fields this version does not read, and
        // so would not match its checksum here.
        if !(1..=FORMAT).contains(&manifest.format)
            || (manifest.hash != HASH_VERSION && manifest.hash != POSTGRES_HASH_VERSION)
        {
            return Err(Error::State {
                message: format!(
                    "the state in {} was written by another version of sluice (format {}, hash {}; this version reads format {FORMAT}, hash {HASH_VERSION}); RESET SYNC {sync} to start over",
                    self.shown(&path),
                    manifest.format,
                    manifest.hash
                ),
            });
        }
        if manifest.format >= SEALED_FORMAT && !manifest.intact() {
            return Err(corrupt(
                "it does not match its checksum: a byte of it changed".into(),
            ));
        }
        Ok(Some(manifest))
    }

    /// The snapshot a manifest names. Its field hashes stay in the store (format 2) until the
    /// diff needs them; each file is checked to exist now, so that a missing one fails before
    /// anything is sent.
    pub async fn snapshot(&self, sync: &str, manifest: &Manifest) -> Result<Snapshot> {
        let path = self.path(&["syncs", sync, &manifest.snapshot]);
        let corrupt = |what: String| corrupt_state(&self.shown(&path), sync, &what);
        let Some(bytes) = self.read(&path).await? else {
            return Err(corrupt("is named by the manifest but missing".into()));
        };
        let sealed = manifest.format >= SEALED_FORMAT;
        let bytes = unseal(bytes, sealed).map_err(&corrupt)?;
        let (schema, batches) =
            read_ipc(bytes).map_err(|e| corrupt(format!("is corrupt ({e})")))?;
        let batch = match batches.len() {
            1 => batches.into_iter().next().expect("one batch"),
            _ => datafusion::arrow::compute::concat_batches(&schema, &batches)
                .map_err(|e| corrupt(format!("is corrupt ({e})")))?,
        };
        if batch.num_rows() as u64 != manifest.rows || batch.num_columns() < 2 {
            return Err(corrupt(format!(
                "holds {} rows but its manifest says {}",
                batch.num_rows(),
                manifest.rows
            )));
        }
        let record_ids = match batch.column(1).data_type() {
            DataType::Null => None,
            _ => Some(
                batch
                    .column(1)
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .cloned()
                    .ok_or_else(|| corrupt("has no record id column".into()))?,
            ),
        };
        let hash_column = |i: usize, name: &str| {
            batch
                .column(i)
                .as_any()
                .downcast_ref::<UInt64Array>()
                .cloned()
                .ok_or_else(|| corrupt(format!("has a bad hash column {name}")))
        };
        if manifest.format == 1 {
            let mut fields = vec![];
            let mut hashes = vec![];
            for (i, field) in schema.fields().iter().enumerate().skip(2) {
                let name = field.name().strip_prefix("h:").unwrap_or(field.name());
                fields.push(name.to_string());
                hashes.push(hash_column(i, name)?);
            }
            return Ok(Snapshot::new(
                batch.column(0).clone(),
                fields,
                hashes,
                record_ids,
            ));
        }
        if batch.num_columns() != 3 || manifest.hash_files.len() != manifest.fields.len() {
            return Err(corrupt(format!(
                "does not match its manifest ({} columns, {} hash files for {} fields)",
                batch.num_columns(),
                manifest.hash_files.len(),
                manifest.fields.len()
            )));
        }
        for name in &manifest.hash_files {
            let file = self.path(&["syncs", sync, name]);
            match self.store.head(&file).await {
                Ok(_) => {}
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(corrupt_state(
                        &self.shown(&file),
                        sync,
                        "is named by the manifest but missing",
                    ));
                }
                Err(e) => return Err(self.io(&file, "read", e)),
            }
        }
        Ok(Snapshot {
            keys: batch.column(0).clone(),
            fields: manifest.fields.clone(),
            rows: hash_column(2, "row")?,
            hashes: FieldHashes::Stored(Arc::new(self.hashes_in(
                sync,
                manifest.hash_files.clone(),
                sealed,
            ))),
            record_ids,
        })
    }

    /// A snapshot's field hashes in `files` (of `sync`'s directory), as this version writes them.
    pub fn stored_hashes(&self, sync: &str, files: Vec<String>) -> StoredHashes {
        self.hashes_in(sync, files, true)
    }

    fn hashes_in(&self, sync: &str, files: Vec<String>, sealed: bool) -> StoredHashes {
        StoredHashes {
            state: self.clone(),
            sync: sync.to_string(),
            files,
            sealed,
        }
    }

    /// Writes the hashes of a new snapshot's field `n` for run `run_id`; returns the file name.
    pub async fn put_hashes(
        &self,
        sync: &str,
        run_id: &str,
        n: usize,
        hashes: &UInt64Array,
    ) -> Result<String> {
        let name = format!("snapshot-{run_id}.h{n}.arrow");
        let schema = Arc::new(Schema::new(vec![Field::new("h", DataType::UInt64, true)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(hashes.clone())])?;
        self.write(&self.path(&["syncs", sync, &name]), ipc_file(&batch)?)
            .await?;
        Ok(name)
    }

    /// The rejects a manifest names.
    pub async fn rejects(&self, sync: &str, manifest: &Manifest) -> Result<Vec<RejectEntry>> {
        let Some(name) = &manifest.rejects else {
            return Ok(vec![]);
        };
        let path = self.path(&["syncs", sync, name]);
        let corrupt = |what: String| Error::State {
            message: format!(
                "the rejects file {} {what}; RESET SYNC {sync} to start over",
                self.shown(&path)
            ),
        };
        let Some(bytes) = self.read(&path).await? else {
            return Err(corrupt("is named by the manifest but missing".into()));
        };
        unseal(bytes, manifest.format >= SEALED_FORMAT)
            .map_err(corrupt)?
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|line| {
                serde_json::from_slice(line).map_err(|e| Error::State {
                    message: format!(
                        "the rejects file {} is corrupt ({e}); RESET SYNC {sync} to start over",
                        self.shown(&path)
                    ),
                })
            })
            .collect()
    }

    /// Writes the main file of a snapshot for run `run_id` (before its commit, which then need
    /// not write it: see [`StateStore::commit`]).
    pub async fn put_snapshot(&self, sync: &str, run_id: &str, snapshot: &Snapshot) -> Result<()> {
        let path = self.path(&["syncs", sync, &snapshot_file(run_id)]);
        self.write(&path, encode_snapshot(snapshot)?).await
    }

    /// Writes `snapshot` (unless `written` says [`StateStore::put_snapshot`] already did) and
    /// `rejects` for run `run_id`, then swaps the manifest to them and removes the files the
    /// previous manifest named.
    pub async fn commit(
        &self,
        mut manifest: Manifest,
        snapshot: &Snapshot,
        written: bool,
        rejects: &[RejectEntry],
        previous: Option<&Manifest>,
    ) -> Result<Manifest> {
        let sync = manifest.sync.clone();
        manifest.format = FORMAT;
        manifest.fields = snapshot.fields.clone();
        manifest.hash_files = match &snapshot.hashes {
            FieldHashes::Loaded(columns) => {
                let mut files = Vec::with_capacity(columns.len());
                for (n, column) in columns.iter().enumerate() {
                    files.push(self.put_hashes(&sync, &manifest.run_id, n, column).await?);
                }
                files
            }
            // Written by this run as it built them (see `SyncRun::next_snapshot`).
            FieldHashes::Stored(stored) => stored.files().to_vec(),
        };
        manifest.snapshot = snapshot_file(&manifest.run_id);
        manifest.rows = snapshot.len() as u64;
        if !written {
            self.put_snapshot(&sync, &manifest.run_id, snapshot).await?;
        }
        manifest.rejects = if rejects.is_empty() {
            None
        } else {
            let name = format!("rejects-{}.jsonl", manifest.run_id);
            let path = self.path(&["syncs", &sync, &name]);
            let mut body = Vec::new();
            for r in rejects {
                serde_json::to_writer(&mut body, r).expect("serializing to memory");
                body.push(b'\n');
            }
            self.write(&path, seal(body)).await?;
            Some(name)
        };
        let path = self.path(&["syncs", &sync, "manifest.json"]);
        self.write(&path, manifest.sealed()).await?;
        if let Some(previous) = previous {
            self.forget(&manifest, previous).await;
        }
        Ok(manifest)
    }

    /// Deletes the files `previous` names that `current` (committed) does not.
    pub async fn forget(&self, current: &Manifest, previous: &Manifest) {
        let kept: HashSet<&String> = current.files().collect();
        for old in previous.files().filter(|f| !kept.contains(f)) {
            let _ = self
                .store
                .delete(&self.path(&["syncs", &current.sync, old]))
                .await;
        }
    }

    /// Deletes snapshot and rejects files of `current`'s sync that it does not name: left by a
    /// run that stopped after a checkpoint (its starting snapshot) or before a commit.
    pub async fn sweep(&self, current: &Manifest) -> Result<()> {
        let kept: HashSet<&String> = current.files().collect();
        for o in self.list(&self.path(&["syncs", &current.sync])).await? {
            let Some(name) = o.location.filename() else {
                continue;
            };
            let ours = name.starts_with("snapshot-") || name.starts_with("rejects-");
            if ours && !kept.contains(&name.to_string()) {
                let _ = self.store.delete(&o.location).await;
            }
        }
        Ok(())
    }

    /// Records, before anything is sent, the keys of records new to the snapshot that a run is
    /// about to send. If the run stops before its commit, the next run treats them as possibly
    /// at the destination (so a mirror sync can still delete them).
    pub async fn put_intent(&self, sync: &str, run_id: &str, keys: ArrayRef) -> Result<()> {
        let path = self.path(&["syncs", sync, &format!("intent-{run_id}.arrow")]);
        let schema = Arc::new(Schema::new(vec![Field::new(
            "key",
            keys.data_type().clone(),
            false,
        )]));
        let batch = RecordBatch::try_new(schema, vec![keys])?;
        self.write(&path, ipc_file(&batch)?).await
    }

    /// The intents of runs that did not commit: (file name, keys).
    pub async fn intents(&self, sync: &str) -> Result<Vec<(String, ArrayRef)>> {
        let mut out = vec![];
        let objects = self.list(&self.path(&["syncs", sync])).await?;
        for o in objects {
            let Some(name) = o.location.filename().map(str::to_string) else {
                continue;
            };
            if !name.starts_with("intent-") {
                continue;
            }
            let Some(bytes) = self.read(&o.location).await? else {
                continue;
            };
            // An intent is written whole or not at all (a put renames a finished file), so an
            // unreadable one was damaged: its keys may be at the destination, and a run without
            // them could lose track of records it sent.
            let keys = unseal(bytes, false)
                .ok()
                .and_then(|bytes| read_ipc(bytes).ok())
                .map(|(_, batches)| batches)
                .and_then(|batches| {
                    let arrays: Vec<ArrayRef> =
                        batches.iter().map(|b| b.column(0).clone()).collect();
                    let refs: Vec<&dyn Array> = arrays.iter().map(|a| a.as_ref()).collect();
                    (!refs.is_empty())
                        .then(|| datafusion::arrow::compute::concat(&refs).ok())
                        .flatten()
                });
            match keys {
                Some(keys) => out.push((name, keys)),
                None => {
                    return Err(Error::State {
                        message: format!(
                            "the state file {} (the keys of records a run was sending) is corrupt; nothing was sent. Restore it, or RESET SYNC {sync} to forget this sync's state (its next run resends every record)",
                            self.shown(&o.location)
                        ),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Removes files of a sync's state that no manifest names: intents a commit has folded into
    /// the snapshot, or the files of a snapshot prepared for a commit that did not happen.
    pub async fn delete_files(&self, sync: &str, names: &[String]) {
        for name in names {
            let _ = self.store.delete(&self.path(&["syncs", sync, name])).await;
        }
    }

    /// Forgets a sync's state (its runs stay in the history).
    pub async fn reset(&self, sync: &str) -> Result<u64> {
        let objects = self.list(&self.path(&["syncs", sync])).await?;
        let mut removed = 0;
        for o in objects {
            if o.location.filename() == Some("lock") {
                continue;
            }
            self.store
                .delete(&o.location)
                .await
                .map_err(|e| self.io(&o.location, "delete", e))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Takes the lock of `sync`, or says who holds it.
    pub async fn lock(&self, sync: &str, run_id: &str) -> Result<SyncLock> {
        let path = self.path(&["syncs", sync, "lock"]);
        let me = LockFile {
            pid: std::process::id(),
            host: hostname(),
            run_id: run_id.to_string(),
            started_at: now(),
        };
        let body = serde_json::to_vec(&me).expect("serializing to memory");
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let mut taken_over = None;
        for _ in 0..2 {
            match self
                .store
                .put_opts(&path, PutPayload::from(body.clone()), create.clone())
                .await
            {
                Ok(_) => {
                    held().lock().expect("lock set").insert(path.to_string());
                    return Ok(SyncLock {
                        store: Arc::clone(&self.store),
                        path,
                        taken_over,
                        held: Some(super::cleanup::Held::new()),
                    });
                }
                Err(object_store::Error::AlreadyExists { .. }) => {
                    let other: Option<LockFile> = match self.store.get(&path).await {
                        Ok(r) => r
                            .bytes()
                            .await
                            .ok()
                            .and_then(|b| serde_json::from_slice(&b).ok()),
                        Err(object_store::Error::NotFound { .. }) => continue,
                        Err(e) => return Err(self.io(&path, "read", e)),
                    };
                    let stale = other.as_ref().is_none_or(|o| {
                        o.host == me.host
                            && (!process_alive(o.pid)
                                || (o.pid == me.pid
                                    && !held().lock().expect("lock set").contains(path.as_ref())))
                    });
                    if !stale {
                        let o = other.expect("checked above");
                        return Err(Error::State {
                            message: format!(
                                "sync {sync} is already running (run {} by process {} on {} since {}); wait for it to finish. If that process is gone, delete {}",
                                o.run_id,
                                o.pid,
                                o.host,
                                o.started_at,
                                self.shown(&path)
                            ),
                        });
                    }
                    tracing::warn!(lock = %self.shown(&path), "Taking over a lock left by a process that is gone.");
                    taken_over = other.map(|o| o.run_id);
                    let _ = self.store.delete(&path).await;
                }
                Err(e) => return Err(self.io(&path, "write", e)),
            }
        }
        Err(Error::State {
            message: format!(
                "cannot take the lock {} of sync {sync}; try again",
                self.shown(&path)
            ),
        })
    }

    /// Writes (or rewrites) a run record.
    pub async fn put_run(&self, run: &RunRecord) -> Result<()> {
        let path = self.run_path(run);
        let body = serde_json::to_vec(run).expect("serializing to memory");
        self.write(&path, body).await
    }

    fn run_path(&self, run: &RunRecord) -> Path {
        let stamp: String = run
            .started_at
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        self.path(&["runs", &run.sync, &format!("{stamp}-{}.json", run.run_id)])
    }

    /// Records an alert's event (`sluice.alerts`).
    pub async fn put_alert_event(&self, event: &AlertEvent) -> Result<()> {
        let stamp: String = event
            .at
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let path = self.path(&[
            "alerts",
            &event.alert,
            &format!("{stamp}-{}.json", event.event_id),
        ]);
        let body = serde_json::to_vec(event).expect("serializing to memory");
        self.write(&path, body).await
    }

    /// Every alert event, oldest first.
    pub async fn alert_events(&self) -> Result<Vec<AlertEvent>> {
        let objects = self.list(&self.path(&["alerts"])).await?;
        let mut events = Vec::with_capacity(objects.len());
        for o in objects {
            let Some(bytes) = self.read(&o.location).await? else {
                continue;
            };
            match serde_json::from_slice::<AlertEvent>(&bytes) {
                Ok(e) => events.push(e),
                Err(e) => {
                    tracing::warn!(file = %self.shown(&o.location), error = %e, "Skipping an unreadable alert event.")
                }
            }
        }
        events.sort_by(|a, b| a.at.cmp(&b.at));
        Ok(events)
    }

    /// Every run record of every sync.
    pub async fn runs(&self) -> Result<Vec<RunRecord>> {
        let prefix = self.path(&["runs"]);
        let objects = self.list(&prefix).await?;
        let mut runs = Vec::with_capacity(objects.len());
        for o in objects {
            // A record deleted since the listing is skipped.
            let Some(bytes) = self.read(&o.location).await? else {
                continue;
            };
            match serde_json::from_slice::<RunRecord>(&bytes) {
                Ok(run) => runs.push(run),
                Err(e) => {
                    tracing::warn!(file = %self.shown(&o.location), error = %e, "Skipping an unreadable run record.")
                }
            }
        }
        runs.sort_by(|a, b| a.started_at.cmp(&b.started_at));
        Ok(runs)
    }

    /// Records as interrupted every run of `sync` still recorded as running: called by a run
    /// that took over the lock of a dead process, so no other run of it is alive. Reads records
    /// newest first and stops at the first that ended, since every run that took over before
    /// settled those older than itself. This covers a chain of deaths (a run killed right after
    /// taking over a dead run's lock, before settling it: its own lock file is then what the
    /// next run takes over), which marking only the lock's last holder did not. Returns how many
    /// records it settled.
    pub async fn settle_dead_runs(&self, sync: &str) -> Result<usize> {
        let mut objects = self.list(&self.path(&["runs", sync])).await?;
        objects.sort_by(|a, b| b.location.cmp(&a.location));
        let mut settled = 0;
        for o in objects {
            let Some(bytes) = self.read(&o.location).await? else {
                continue;
            };
            let Ok(mut run) = serde_json::from_slice::<RunRecord>(&bytes) else {
                continue;
            };
            if run.status != "running" {
                break;
            }
            interrupted(&mut run);
            run.finished_at.get_or_insert_with(now);
            self.put_run(&run).await?;
            settled += 1;
        }
        Ok(settled)
    }

    /// The latest run record of `sync` (record names start with the run's start time).
    pub async fn last_run(&self, sync: &str) -> Result<Option<RunRecord>> {
        let objects = self.list(&self.path(&["runs", sync])).await?;
        let Some(latest) = objects.iter().max_by(|a, b| a.location.cmp(&b.location)) else {
            return Ok(None);
        };
        Ok(self
            .read(&latest.location)
            .await?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Names of syncs that have state.
    pub async fn synced(&self) -> Result<Vec<String>> {
        let prefix = self.path(&["syncs"]);
        let listing = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| self.io(&prefix, "list", e))?;
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }
}

/// Writes a local state file as a put does (a finished temporary file renamed into place), readable
/// by its owner only: rejects hold record payloads, run records the destinations' errors. Folders
/// it creates are the owner's only too.
fn write_private(file: &std::path::Path, payload: &PutPayload) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(parent) = file.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    let temporary = file.with_file_name(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = (|| {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        for chunk in payload.iter() {
            out.write_all(chunk)?;
        }
        std::fs::rename(&temporary, file)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

/// The name of run `run_id`'s snapshot main file.
pub fn snapshot_file(run_id: &str) -> String {
    format!("snapshot-{run_id}.arrow")
}

/// A snapshot's main file: `key`, `record_id` and `row` (the row hashes) per record.
fn encode_snapshot(snapshot: &Snapshot) -> Result<Bytes> {
    let key_type = match snapshot.keys.data_type() {
        DataType::Null => DataType::Int64,
        t => t.clone(),
    };
    let keys: ArrayRef = if snapshot.keys.data_type() == &DataType::Null {
        Arc::new(datafusion::arrow::array::Int64Array::from(Vec::<i64>::new()))
    } else {
        Arc::clone(&snapshot.keys)
    };
    let (id_type, ids): (DataType, ArrayRef) = match &snapshot.record_ids {
        Some(ids) => (DataType::Utf8, Arc::new(ids.clone())),
        None => (
            DataType::Null,
            Arc::new(datafusion::arrow::array::NullArray::new(keys.len())),
        ),
    };
    let schema = Schema::new(vec![
        Field::new("key", key_type, false),
        Field::new("record_id", id_type, true),
        Field::new("row", DataType::UInt64, true),
    ]);
    let columns: Vec<ArrayRef> = vec![keys, ids, Arc::new(snapshot.rows.clone())];
    ipc_file(&RecordBatch::try_new(Arc::new(schema), columns)?)
}

/// The error for a state file that cannot be used.
fn corrupt_state(path: &str, sync: &str, what: &str) -> Error {
    Error::State {
        message: format!(
            "the state snapshot {path} {what}; nothing was sent. Restore it, or RESET SYNC {sync} to forget this sync's state (its next run resends every record)"
        ),
    }
}

/// A snapshot's field hashes, left in the state store: one file per field.
#[derive(Debug, Clone)]
pub struct StoredHashes {
    state: StateStore,
    sync: String,
    files: Vec<String>,
    /// Whether the files carry seals (format 3 and later).
    sealed: bool,
}

#[async_trait::async_trait]
impl HashStore for StoredHashes {
    fn files(&self) -> &[String] {
        &self.files
    }

    async fn column(&self, i: usize, rows: usize) -> Result<UInt64Array> {
        let path = self.state.path(&["syncs", &self.sync, &self.files[i]]);
        let shown = self.state.shown(&path);
        let corrupt = |what: String| corrupt_state(&shown, &self.sync, &what);
        let Some(bytes) = self.state.read(&path).await? else {
            return Err(corrupt("is named by the manifest but missing".into()));
        };
        let bytes = unseal(bytes, self.sealed).map_err(&corrupt)?;
        let (_, batches) = read_ipc(bytes).map_err(|e| corrupt(format!("is corrupt ({e})")))?;
        let column = match batches.as_slice() {
            [batch] if batch.num_columns() == 1 => batch
                .column(0)
                .as_any()
                .downcast_ref::<UInt64Array>()
                .cloned(),
            _ => None,
        };
        match column {
            Some(c) if c.len() == rows => Ok(c),
            Some(c) => Err(corrupt(format!(
                "holds {} hashes for a snapshot of {rows} records",
                c.len()
            ))),
            None => Err(corrupt("is not a column of hashes".into())),
        }
    }
}

/// One batch as an Arrow IPC file, sealed.
fn ipc_file(batch: &RecordBatch) -> Result<Bytes> {
    let mut buf = Vec::with_capacity(batch.get_array_memory_size() + 1024);
    let mut writer = FileWriter::try_new(&mut buf, &batch.schema())?;
    writer.write(batch)?;
    writer.finish()?;
    drop(writer);
    Ok(seal(buf))
}

/// Decodes an Arrow IPC file without copying its buffers (the arrays point into `bytes`).
fn read_ipc(
    bytes: Bytes,
) -> std::result::Result<(SchemaRef, Vec<RecordBatch>), datafusion::arrow::error::ArrowError> {
    use datafusion::arrow::buffer::Buffer;
    use datafusion::arrow::error::ArrowError;
    use datafusion::arrow::ipc::convert::fb_to_schema;
    use datafusion::arrow::ipc::reader::{FileDecoder, read_footer_length};
    use datafusion::arrow::ipc::root_as_footer;
    let buffer = Buffer::from(bytes);
    if buffer.len() < 10 {
        return Err(ArrowError::IpcError("the file is too short".into()));
    }
    let trailer = buffer.len() - 10;
    let footer_len = read_footer_length(buffer[trailer..].try_into().expect("10 bytes"))?;
    let footer_start = trailer
        .checked_sub(footer_len)
        .ok_or_else(|| ArrowError::IpcError("the footer is truncated".into()))?;
    let footer = root_as_footer(&buffer[footer_start..trailer])
        .map_err(|e| ArrowError::IpcError(format!("bad footer: {e}")))?;
    let schema = Arc::new(fb_to_schema(
        footer
            .schema()
            .ok_or_else(|| ArrowError::IpcError("no schema".into()))?,
    ));
    let decoder = FileDecoder::new(Arc::clone(&schema), footer.version());
    let mut batches = vec![];
    for block in footer.recordBatches().into_iter().flatten() {
        let len = usize::try_from(block.bodyLength())
            .ok()
            .zip(usize::try_from(block.metaDataLength()).ok())
            .and_then(|(body, meta)| body.checked_add(meta));
        let start = usize::try_from(block.offset()).ok();
        let Some((start, len)) = start.zip(len) else {
            return Err(ArrowError::IpcError(
                "a record batch is out of range".into(),
            ));
        };
        if start.checked_add(len).is_none_or(|end| end > footer_start) {
            return Err(ArrowError::IpcError("a record batch is truncated".into()));
        }
        let data = buffer.slice_with_length(start, len);
        if let Some(batch) = decoder.read_record_batch(block, &data)? {
            batches.push(batch);
        }
    }
    Ok((schema, batches))
}

/// Marks a run record as stopped before it finished.
pub fn interrupted(run: &mut RunRecord) {
    run.status = "interrupted".into();
    run.error = Some(
        "the process stopped before the run finished; records it sent without a commit are sent again"
            .into(),
    );
}

/// UTC now, RFC 3339 with milliseconds.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot written by format 1 (every field's hashes in the snapshot file) still loads,
    /// with the same row hashes a format-2 commit of it stores.
    #[tokio::test]
    async fn format_1_snapshots_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::local(dir.path()).unwrap();
        let email = UInt64Array::from(vec![Some(11), Some(12), None]);
        let plan = UInt64Array::from(vec![Some(21), None, None]);
        let schema = Schema::new(vec![
            Field::new("key", DataType::Int64, false),
            Field::new("record_id", DataType::Null, true),
            Field::new("h:email", DataType::UInt64, true),
            Field::new("h:plan", DataType::UInt64, true),
        ]);
        let batch = RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(datafusion::arrow::array::Int64Array::from(vec![1, 2, 3])),
                Arc::new(datafusion::arrow::array::NullArray::new(3)),
                Arc::new(email.clone()),
                Arc::new(plan.clone()),
            ],
        )
        .unwrap();
        let path = state.path(&["syncs", "s", "snapshot-old.arrow"]);
        state.write(&path, ipc_file(&batch).unwrap()).await.unwrap();
        let manifest = r#"{"format":1,"hash":"xxh3_64/v1","sync":"s","target":"t.o","key":"id",
            "fields":["email","plan"],"snapshot":"snapshot-old.arrow","rows":3,"rejects":null,
            "run_id":"old","committed_at":"2026-11-01T00:00:00Z"}"#;
        let path = state.path(&["syncs", "s", "manifest.json"]);
        state
            .write(&path, manifest.as_bytes().to_vec())
            .await
            .unwrap();

        let m = state.manifest("s").await.unwrap().unwrap();
        let old = state.snapshot("s", &m).await.unwrap();
        assert_eq!(old.fields, vec!["email", "plan"]);
        assert!(matches!(old.hashes, FieldHashes::Loaded(_)));
        assert!(old.unknown(2) && !old.unknown(1));
        assert_eq!(old.field_column(1).await.unwrap(), plan);
        let expected = Snapshot::new(
            old.keys.clone(),
            old.fields.clone(),
            vec![email, plan],
            None,
        );
        assert_eq!(old.rows, expected.rows);

        // Committed again, it is format 2 and reads back the same.
        let mut next = m.clone();
        next.run_id = "new".into();
        state
            .commit(next, &old, false, &[], Some(&m))
            .await
            .unwrap();
        let m2 = state.manifest("s").await.unwrap().unwrap();
        assert_eq!((m2.format, m2.hash_files.len()), (FORMAT, 2));
        let new = state.snapshot("s", &m2).await.unwrap();
        assert!(matches!(new.hashes, FieldHashes::Stored(_)));
        assert_eq!(new.rows, old.rows);
        for f in 0..2 {
            assert_eq!(
                new.field_column(f).await.unwrap(),
                old.field_column(f).await.unwrap()
            );
        }
        assert!(
            !dir.path().join("syncs/s/snapshot-old.arrow").exists(),
            "the old snapshot is removed"
        );
    }

    /// Everything a run reads of a sync's state, as text to compare.
    async fn load_everything(state: &StateStore) -> Result<String> {
        let m = state.manifest("s").await?.expect("a manifest");
        let snapshot = state.snapshot("s", &m).await?;
        let mut out = format!(
            "{:?} {:?} {:?} {:?}",
            snapshot.keys, snapshot.rows, snapshot.record_ids, snapshot.fields
        );
        for f in 0..snapshot.fields.len() {
            out.push_str(&format!("{:?}", snapshot.field_column(f).await?));
        }
        for r in state.rejects("s", &m).await? {
            out.push_str(&format!("{} {:?} {}", r.error_message, r.key, r.payload));
        }
        for (name, keys) in state.intents("s").await? {
            out.push_str(&format!("{name} {keys:?}"));
        }
        Ok(out)
    }

    /// Issue 17: a flipped byte anywhere in a sync's state is a clear error naming the file, or
    /// (where the byte changed nothing the state means) the same state: never a panic, never a
    /// different snapshot.
    #[tokio::test]
    async fn every_flipped_byte_of_the_state_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::local(dir.path()).unwrap();
        let snapshot = Snapshot::new(
            Arc::new(datafusion::arrow::array::Int64Array::from(vec![1, 2, 3])),
            vec!["email".into(), "plan".into()],
            vec![
                UInt64Array::from(vec![Some(11), Some(12), None]),
                UInt64Array::from(vec![Some(21), Some(22), Some(23)]),
            ],
            Some(StringArray::from(vec![Some("a"), Some("b"), None])),
        );
        let manifest = Manifest {
            format: FORMAT,
            hash: HASH_VERSION.into(),
            sync: "s".into(),
            target: "t.o".into(),
            key: Some("id".into()),
            fields: vec![],
            snapshot: String::new(),
            hash_files: vec![],
            rows: 0,
            rejects: None,
            run_id: "r1".into(),
            committed_at: now(),
            checksum: None,
        };
        let reject = RejectEntry {
            sync: "s".into(),
            run_id: "r1".into(),
            target: "t.o".into(),
            key: Some("4".into()),
            operation: "insert".into(),
            error_code: "invalid".into(),
            error_message: "refused".into(),
            payload: "{\"id\":4}".into(),
            attempts: 1,
            first_seen: now(),
            last_seen: now(),
        };
        state
            .commit(manifest, &snapshot, false, &[reject], None)
            .await
            .unwrap();
        let keys: ArrayRef = Arc::new(datafusion::arrow::array::Int64Array::from(vec![5, 6]));
        state.put_intent("s", "r2", keys).await.unwrap();
        let expected = load_everything(&state).await.unwrap();

        let files: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path().join("syncs/s"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(
            files.len(),
            6,
            "manifest, snapshot, 2 hash files, rejects, intent"
        );
        let (mut caught, mut harmless) = (0, 0);
        for file in &files {
            let original = std::fs::read(file).unwrap();
            for i in 0..original.len() {
                for mask in [0x01u8, 0x80, 0xff] {
                    let mut bytes = original.clone();
                    bytes[i] ^= mask;
                    std::fs::write(file, &bytes).unwrap();
                    match load_everything(&state).await {
                        Ok(got) => {
                            assert_eq!(got, expected, "{} byte {i} ^ {mask:#x}", file.display());
                            harmless += 1;
                        }
                        Err(e) => {
                            let e = e.to_string();
                            let name = file.file_name().unwrap().to_str().unwrap();
                            assert!(
                                e.contains(name)
                                    && (e.contains("corrupt") || e.contains("another version")),
                                "{} byte {i} ^ {mask:#x}: {e}",
                                file.display()
                            );
                            caught += 1;
                        }
                    }
                }
            }
            std::fs::write(file, &original).unwrap();
        }
        assert_eq!(load_everything(&state).await.unwrap(), expected);
        // Only bytes of the manifest's JSON that leave its meaning whole (a letter's case in a
        // hex digit, say) may pass; every byte of every other file is caught.
        assert!(
            caught > 10 * harmless,
            "caught {caught}, harmless {harmless}"
        );
    }

    /// A manifest of a later format (with fields this version does not know) is refused as
    /// another version's, not as corrupt.
    #[tokio::test]
    async fn a_later_format_is_another_version_not_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::local(dir.path()).unwrap();
        let manifest = r#"{"format":4,"hash":"xxh3_64/v1","sync":"s","target":"t.o","key":"id",
            "fields":[],"snapshot":"snapshot-x.arrow","rows":0,"rejects":null,"run_id":"x",
            "committed_at":"2027-01-01T00:00:00Z","checksum":"0000000000000000","shards":[1]}"#;
        let path = state.path(&["syncs", "s", "manifest.json"]);
        state
            .write(&path, manifest.as_bytes().to_vec())
            .await
            .unwrap();
        let err = state.manifest("s").await.unwrap_err().to_string();
        assert!(err.contains("another version"), "{err}");
    }

    /// Issue 17: state files hold record payloads (rejects) and errors (run records): readable by
    /// their owner only, in folders that are the owner's only.
    #[tokio::test]
    async fn state_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        let state = StateStore::local(&root).unwrap();
        let keys: ArrayRef = Arc::new(datafusion::arrow::array::Int64Array::from(vec![1]));
        state.put_intent("s", "r1", keys).await.unwrap();
        state
            .put_run(&RunRecord {
                run_id: "r1".into(),
                sync: "s".into(),
                started_at: now(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let files = crate::sync::state::tests::all_files(&root);
        assert_eq!(files.len(), 2, "{files:?}");
        for file in files {
            assert_eq!(mode(&file), 0o600, "{}", file.display());
            let mut dir = file.parent().unwrap();
            while dir != root.as_path() {
                assert_eq!(mode(dir), 0o700, "{}", dir.display());
                dir = dir.parent().unwrap();
            }
        }
        assert_eq!(mode(&root), 0o700);
    }

    fn all_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = vec![];
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            match entry.path() {
                p if p.is_dir() => out.extend(all_files(&p)),
                p => out.push(p),
            }
        }
        out
    }

    #[tokio::test]
    async fn lock_refuses_a_second_holder_and_frees_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::local(dir.path()).unwrap();
        let lock = state.lock("s", "run1").await.unwrap();
        // Held by this process and known to it: a second run refuses.
        let err = state.lock("s", "run2").await.unwrap_err().to_string();
        assert!(
            err.contains("already running") && err.contains("run1"),
            "{err}"
        );
        drop(lock);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        state.lock("s", "run3").await.unwrap();
    }

    /// A run killed right after taking over a dead run's lock leaves two runs recorded as
    /// running; the next run's lock names only the second. Both are settled, and the records
    /// of runs that ended are left as they are.
    #[tokio::test]
    async fn a_chain_of_dead_runs_is_recorded_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::local(dir.path()).unwrap();
        for (i, status) in ["succeeded", "running", "running"].iter().enumerate() {
            state
                .put_run(&RunRecord {
                    run_id: format!("r{i}"),
                    sync: "s".into(),
                    started_at: format!("2026-12-07T10:00:0{i}.000Z"),
                    status: status.to_string(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        assert_eq!(state.settle_dead_runs("s").await.unwrap(), 2);
        let runs = state.runs().await.unwrap();
        let statuses: Vec<_> = runs.iter().map(|r| r.status.as_str()).collect();
        assert_eq!(statuses, ["succeeded", "interrupted", "interrupted"]);
        assert!(runs[1].finished_at.is_some() && runs[0].finished_at.is_none());
        assert_eq!(state.settle_dead_runs("s").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_lock_left_by_a_dead_process_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::local(dir.path()).unwrap();
        let lock = LockFile {
            pid: i32::MAX as u32,
            host: hostname(),
            run_id: "dead".into(),
            started_at: now(),
        };
        std::fs::create_dir_all(dir.path().join("syncs/s")).unwrap();
        std::fs::write(
            dir.path().join("syncs/s/lock"),
            serde_json::to_vec(&lock).unwrap(),
        )
        .unwrap();
        state.lock("s", "alive").await.unwrap();
    }
}
