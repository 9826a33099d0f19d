//! Watching a model's inputs for `SCHEDULE ON CHANGE`: each input table gives a
//! [`ChangeProbe`], a cheap question whose answer changes when the table's data does (a
//! Postgres table's `pg_stat_user_tables` counters, a file folder's listing, or the answer of
//! a sync's `change_query`). The probes never read the data itself.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;

use crate::error::{Error, Result};

/// A cheap fingerprint of some data: a different fingerprint means the data changed (a same
/// one, that it very probably did not).
#[async_trait]
pub trait ChangeProbe: Debug + Send + Sync {
    /// What is watched and how, for logs and errors (`wh.public.accounts (pg_stat_user_tables)`).
    fn describe(&self) -> String;
    async fn fingerprint(&self) -> Result<String>;
}

/// Every probe of a model, as one.
#[derive(Debug)]
pub struct AllOf(pub Vec<Arc<dyn ChangeProbe>>);

#[async_trait]
impl ChangeProbe for AllOf {
    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|p| p.describe())
            .collect::<Vec<_>>()
            .join(", ")
    }

    async fn fingerprint(&self) -> Result<String> {
        let parts = futures::future::try_join_all(self.0.iter().map(|p| p.fingerprint())).await?;
        Ok(parts.join("|"))
    }
}

/// A folder of files (an external table): the name, size, modification time and ETag of each
/// file it lists.
pub struct FilesProbe {
    pub table: String,
    pub urls: Vec<ListingTableUrl>,
    pub ctx: SessionContext,
}

impl Debug for FilesProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilesProbe")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl ChangeProbe for FilesProbe {
    fn describe(&self) -> String {
        format!("{} (its files' listing)", self.table)
    }

    async fn fingerprint(&self) -> Result<String> {
        let mut entries = vec![];
        for url in &self.urls {
            let store_url = ObjectStoreUrl::parse(url.object_store())?;
            let store = self.ctx.runtime_env().object_store(&store_url)?;
            let listed: Vec<_> =
                store
                    .list(Some(url.prefix()))
                    .try_collect()
                    .await
                    .map_err(|e| Error::Write {
                        message: format!("cannot list the files of {}: {e}", self.table),
                    })?;
            for meta in listed {
                if !url.contains(&meta.location, false) && url.prefix() != &meta.location {
                    continue;
                }
                entries.push(format!(
                    "{}:{}:{}:{}",
                    meta.location,
                    meta.size,
                    meta.last_modified.timestamp_nanos_opt().unwrap_or_default(),
                    meta.e_tag.unwrap_or_default()
                ));
            }
        }
        entries.sort();
        Ok(format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(entries.join("\n").as_bytes())
        ))
    }
}
