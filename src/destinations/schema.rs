//! `DestinationSchema`: a destination connection as a DataFusion schema, resolving `conn.object`
//! lazily through the destination.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::error::Result;

use super::{Destination, DestinationTable};

/// Makes `conn.object` resolve to a [`DestinationTable`].
#[derive(Debug)]
pub struct DestinationSchema {
    destination: Arc<dyn Destination>,
}

impl DestinationSchema {
    pub fn new(destination: Arc<dyn Destination>) -> Self {
        Self { destination }
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
        let reader = self.destination.reader(&object).await?;
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
