//! Object stores for any URL a statement names: local paths, `s3://`, `gs://`, `az://`, `http(s)://`,
//! each built on first use from the standard environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`).

use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::{ClientOptions, ObjectStore};
use url::Url;

/// An [`ObjectStoreRegistry`] that builds a store for a bucket or host the first time a statement
/// touches it, configured from the environment the way each cloud's own tools are.
#[derive(Debug, Default)]
pub struct EnvObjectStoreRegistry {
    inner: DefaultObjectStoreRegistry,
}

impl EnvObjectStoreRegistry {
    pub fn new() -> Self {
        Self::default()
    }
}

impl ObjectStoreRegistry for EnvObjectStoreRegistry {
    fn register_store(
        &self,
        url: &Url,
        store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        self.inner.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        self.inner.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> Result<Arc<dyn ObjectStore>> {
        if let Ok(store) = self.inner.get_store(url) {
            return Ok(store);
        }
        let store = store_from_env(url)?;
        self.inner.register_store(url, Arc::clone(&store));
        Ok(store)
    }
}

/// Builds the store for `url`'s bucket/container/host from environment variables.
pub fn store_from_env(url: &Url) -> Result<Arc<dyn ObjectStore>> {
    let external = |e: object_store::Error| {
        DataFusionError::Execution(format!(
            "cannot open object store for {}: {e}; check the URL and the credentials in the environment",
            redacted_origin(url)
        ))
    };
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "s3" | "s3a" => Arc::new(
            AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(external)?,
        ),
        "gs" | "gcs" => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(external)?,
        ),
        "az" | "adl" | "azure" | "abfs" | "abfss" => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .build()
                .map_err(external)?,
        ),
        "http" | "https" => Arc::new(
            HttpBuilder::new()
                .with_url(url.origin().ascii_serialization())
                // object_store refuses plain http unless told; the user wrote http:// on purpose.
                .with_client_options(ClientOptions::new().with_allow_http(url.scheme() == "http"))
                .build()
                .map_err(external)?,
        ),
        other => {
            return Err(DataFusionError::Plan(format!(
                "no object store for URL scheme '{other}://'; use a local path or an s3://, gs://, az:// or http(s):// URL"
            )));
        }
    };
    Ok(store)
}

fn redacted_origin(url: &Url) -> String {
    format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_stores_for_cloud_schemes_without_io() {
        let registry = EnvObjectStoreRegistry::new();
        for u in ["s3://bucket/path/x.parquet", "http://127.0.0.1:1/x"] {
            let url = Url::parse(u).unwrap();
            let first = registry.get_store(&url).expect(u);
            let again = registry.get_store(&url).unwrap();
            assert!(Arc::ptr_eq(&first, &again), "{u} is cached");
        }
        let err = registry
            .get_store(&Url::parse("ftp://x/y").unwrap())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("no object store for URL scheme 'ftp://'")
        );
    }
}
