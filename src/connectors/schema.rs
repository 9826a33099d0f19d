//! `DestinationSchema`: a destination connection as a DataFusion schema, resolving `conn.object`
//! lazily through the destination.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{MemTable, SchemaProvider, TableProvider};
use datafusion::error::Result;

use super::{Destination, DestinationTable};

/// Makes `conn.object` resolve to a [`DestinationTable`].
#[derive(Debug)]
pub struct DestinationSchema {
    destination: Arc<dyn Destination>,
    /// Under `sluice check`: the fields an insert planned earlier in the file would give an
    /// object that does not hold data yet, so later statements reading it can be planned.
    planned: Mutex<HashMap<String, SchemaRef>>,
}

impl DestinationSchema {
    pub fn new(destination: Arc<dyn Destination>) -> Self {
        Self {
            destination,
            planned: Mutex::default(),
        }
    }

    /// The destination this schema resolves objects through.
    pub fn destination(&self) -> &Arc<dyn Destination> {
        &self.destination
    }

    /// The fields of `object` as the destination already knows them (see
    /// [`super::Destination::known_fields`]).
    pub fn known_fields(&self, object: &str) -> Option<SchemaRef> {
        self.destination.known_fields(object)
    }

    /// Records (for `sluice check`) that a planned, unexecuted insert would write `fields` to
    /// `object`.
    pub fn plan_object(&self, object: &str, fields: SchemaRef) {
        self.planned
            .lock()
            .expect("planned lock")
            .insert(object.to_string(), fields);
    }
}

#[async_trait]
impl SchemaProvider for DestinationSchema {
    fn table_names(&self) -> Vec<String> {
        self.destination.object_names()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        let Some(object) = self.destination.object(name).await? else {
            return Ok(None);
        };
        let mut reader = self.destination.reader(&object).await?;
        if reader.is_none()
            && let Some(fields) = self.planned.lock().expect("planned lock").get(name)
        {
            let empty: Arc<dyn TableProvider> =
                Arc::new(MemTable::try_new(Arc::clone(fields), vec![vec![]])?);
            reader = Some(empty);
        }
        Ok(Some(Arc::new(DestinationTable::new(
            Arc::clone(&self.destination),
            object,
            reader,
        ))))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.destination.object_names().iter().any(|n| n == name)
    }
}
