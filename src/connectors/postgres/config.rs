//! Options of the `postgres` connection, the connection pool and TLS.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::SslMode;

use crate::delivery::settings::duration;
use crate::error::{Error, Result};
use crate::options::{OptionSpec, Options};

/// Rows per transaction unless `batch_size` says otherwise.
pub const DEFAULT_BATCH_SIZE: usize = 100_000;
/// Connections in the pool unless `pool_size` says otherwise.
pub const DEFAULT_POOL_SIZE: usize = 4;
/// How long opening a connection may take unless `connect_timeout` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one statement may run unless `statement_timeout` says otherwise.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a statement waits for a pooled connection unless `pool_timeout` says otherwise.
pub const DEFAULT_POOL_TIMEOUT: Duration = Duration::from_secs(60);

/// The options `CREATE CONNECTION … TYPE postgres` accepts.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("url", "postgres URL", "", "postgres://user:password@host:port/database (or key=value form); keep passwords out of files: url env('WAREHOUSE_URL')").secret(),
    OptionSpec::new("schema", "name", "public", "the schema whose tables are also reachable as conn.table"),
    OptionSpec::new("tls", "disable | prefer | require | verify-full", "the url's sslmode, else prefer", "'require' encrypts without verifying; 'verify-full' verifies the certificate and host name"),
    OptionSpec::new("tls_root_cert", "path", "the system's roots", "a PEM file of CA certificates to verify the server with (needs tls 'verify-full')"),
    OptionSpec::new("pool_size", "integer", "4", "connections kept open at most"),
    OptionSpec::new("batch_size", "integer", "100000", "rows written per transaction"),
    OptionSpec::new("connect_timeout", "duration", "10s", "how long opening a connection may take"),
    OptionSpec::new("statement_timeout", "duration", "1h", "how long one statement (a read, a batch's COPY, the warehouse-side diff) may run before Postgres cancels it"),
    OptionSpec::new("pool_timeout", "duration", "60s", "how long a statement waits for a free pooled connection"),
    OptionSpec::new("defer_key_index", "boolean", "true", "true: a sync's first run into an empty table drops the index of its match key and builds it once when the rows are in, faster than an insertion per row; the table is locked (ACCESS EXCLUSIVE) until the run commits. false keeps the index and a lighter lock"),
];

/// How to secure the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

impl Tls {
    /// The option's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Tls::Disable => "disable",
            Tls::Prefer => "prefer",
            Tls::Require => "require",
            Tls::VerifyFull => "verify-full",
        }
    }
}

/// A parsed `postgres` connection.
#[derive(Debug, Clone)]
pub struct PgConfig {
    pub pg: tokio_postgres::Config,
    pub schema: String,
    pub tls: Tls,
    pub root_cert: Option<String>,
    pub pool_size: usize,
    pub batch_size: usize,
    /// Whether a streaming first run into an empty table builds its key's index after the load.
    pub defer_key_index: bool,
    /// How long a statement waits for a pooled connection.
    pub pool_timeout: Duration,
}

impl PgConfig {
    pub fn from_options(options: &Options) -> Result<Self> {
        let url = options.secret("url")?.ok_or_else(|| Error::Option {
            key: "url".into(),
            message: "a postgres connection needs url, e.g. OPTIONS (url env('WAREHOUSE_URL'))"
                .into(),
        })?;
        // The parser's message can quote the url; never show it.
        let mut pg: tokio_postgres::Config = url.expose().parse().map_err(|_| Error::Option {
            key: "url".into(),
            message: "url is not a valid Postgres connection string; expected postgres://user:password@host:port/database".into(),
        })?;
        if pg.get_hosts().is_empty() {
            pg.host("localhost");
        }
        if pg.get_user().is_none() {
            pg.user(std::env::var("USER").unwrap_or_else(|_| "postgres".into()));
        }
        let connect_timeout =
            duration(options, "connect_timeout")?.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let statement_timeout =
            duration(options, "statement_timeout")?.unwrap_or(DEFAULT_STATEMENT_TIMEOUT);
        let pool_timeout = duration(options, "pool_timeout")?.unwrap_or(DEFAULT_POOL_TIMEOUT);
        // Timestamps compare and print in UTC whatever the server's default is, and filters
        // pushed down mean what they mean in DataFusion. No statement runs unbounded.
        pg.options(format!(
            "-c TimeZone=UTC -c DateStyle=ISO -c statement_timeout={}",
            statement_timeout.as_millis()
        ));
        pg.application_name("sluice");
        pg.connect_timeout(connect_timeout);
        // A server that vanishes mid-COPY is noticed instead of waited on forever.
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_secs(30));
        let tls = match options.string("tls")?.as_deref() {
            None => match pg.get_ssl_mode() {
                SslMode::Disable => Tls::Disable,
                SslMode::Require => Tls::Require,
                _ => Tls::Prefer,
            },
            Some("disable") => Tls::Disable,
            Some("prefer") => Tls::Prefer,
            Some("require") => Tls::Require,
            Some("verify-full") => Tls::VerifyFull,
            Some(other) => {
                return Err(Error::Option {
                    key: "tls".into(),
                    message: format!(
                        "tls '{other}' is not one of disable, prefer, require, verify-full"
                    ),
                });
            }
        };
        pg.ssl_mode(match tls {
            Tls::Disable => SslMode::Disable,
            Tls::Prefer => SslMode::Prefer,
            Tls::Require | Tls::VerifyFull => SslMode::Require,
        });
        let root_cert = options.string("tls_root_cert")?;
        if root_cert.is_some() && tls != Tls::VerifyFull {
            return Err(Error::Option {
                key: "tls_root_cert".into(),
                message: "tls_root_cert is only used to verify the server: add tls 'verify-full' (or remove tls_root_cert)".into(),
            });
        }
        let pool_size: usize = options.parse("pool_size")?.unwrap_or(DEFAULT_POOL_SIZE);
        let batch_size: usize = options.parse("batch_size")?.unwrap_or(DEFAULT_BATCH_SIZE);
        if pool_size == 0 || batch_size == 0 {
            return Err(Error::Option {
                key: if pool_size == 0 {
                    "pool_size"
                } else {
                    "batch_size"
                }
                .into(),
                message: "must be at least 1".into(),
            });
        }
        Ok(Self {
            pg,
            schema: options.string("schema")?.unwrap_or_else(|| "public".into()),
            tls,
            root_cert,
            pool_size,
            batch_size,
            defer_key_index: options.parse("defer_key_index")?.unwrap_or(true),
            pool_timeout,
        })
    }

    /// The host, if the connection reaches one beyond this machine without verifying it (as
    /// libpq's default `prefer` does: encrypted if the server offers it, authenticated never).
    pub fn unverified_remote_host(&self) -> Option<String> {
        if self.tls == Tls::VerifyFull {
            return None;
        }
        self.pg.get_hosts().iter().find_map(|h| match h {
            tokio_postgres::config::Host::Tcp(host) => {
                let loopback = host == "localhost"
                    || host
                        .trim_matches(|c| c == '[' || c == ']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                (!loopback).then(|| host.clone())
            }
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(_) => None,
        })
    }

    /// Where the connection goes, without credentials (for EXPLAIN and messages).
    pub fn describe(&self) -> String {
        let host = match self.pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{host}:{port}/{}",
            self.pg.get_dbname().unwrap_or("postgres")
        )
    }

    /// The pool. Connections are opened on first use, not here.
    pub fn pool(&self) -> Result<Pool> {
        // A connection goes back into use only if it is idle, outside any transaction.
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Custom(super::transaction::IDLE_CHECK.into()),
        };
        let manager = match self.tls {
            Tls::Disable => {
                Manager::from_config(self.pg.clone(), tokio_postgres::NoTls, manager_config)
            }
            _ => Manager::from_config(self.pg.clone(), self.tls_connector()?, manager_config),
        };
        Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(self.pool_timeout))
            .recycle_timeout(Some(self.pool_timeout))
            .build()
            .map_err(|e| Error::Option {
                key: "pool_size".into(),
                message: format!("cannot build the connection pool: {e}"),
            })
    }

    pub(super) fn tls_connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error(e.to_string()))?;
        let config = if self.tls == Tls::VerifyFull {
            let mut roots = rustls::RootCertStore::empty();
            match &self.root_cert {
                Some(path) => {
                    let pem = std::fs::read(path)
                        .map_err(|e| tls_error(format!("cannot read tls_root_cert {path}: {e}")))?;
                    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
                        let cert: rustls::pki_types::CertificateDer =
                            cert.map_err(|e| tls_error(format!("{path}: {e}")))?;
                        roots
                            .add(cert)
                            .map_err(|e| tls_error(format!("{path}: {e}")))?;
                    }
                }
                None => {
                    for cert in rustls_native_certs::load_native_certs().certs {
                        let _ = roots.add(cert);
                    }
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            // libpq's `require`: encrypted, the certificate is not checked.
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        };
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }
}

fn tls_error(message: String) -> Error {
    Error::Option {
        key: "tls".into(),
        message,
    }
}

/// Accepts any server certificate (still checking the handshake's signatures), as libpq's
/// `sslmode=require` does.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::OptionValue;

    fn config(pairs: &[(&str, &str)]) -> Result<PgConfig> {
        let given = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OptionValue::Literal(v.to_string())))
            .collect();
        PgConfig::from_options(&Options::new("pg", OPTIONS, given)?)
    }

    /// Issue 17: a root certificate without verification is an error that says what to set, and
    /// a remote host reached without verification is told apart from a local one.
    #[test]
    fn tls_settings_say_what_they_do() {
        let err = config(&[
            ("url", "postgres://u@db.example.com/x"),
            ("tls_root_cert", "/ca.pem"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("tls 'verify-full'"), "{err}");
        let remote = config(&[("url", "postgres://u@db.example.com/x")]).unwrap();
        assert_eq!(remote.tls, Tls::Prefer);
        assert_eq!(
            remote.unverified_remote_host().as_deref(),
            Some("db.example.com")
        );
        for local in ["localhost", "127.0.0.1", "[::1]"] {
            let c = config(&[("url", &format!("postgres://u@{local}/x"))]).unwrap();
            assert_eq!(c.unverified_remote_host(), None, "{local}");
        }
        let verified = config(&[
            ("url", "postgres://u@db.example.com/x"),
            ("tls", "verify-full"),
            ("tls_root_cert", "/ca.pem"),
        ])
        .unwrap();
        assert_eq!(verified.unverified_remote_host(), None);
    }

    /// Issue 17: connects, statements and pool waits are bounded, by options with defaults.
    #[test]
    fn every_wait_is_bounded() {
        let c = config(&[("url", "postgres://u@localhost/x")]).unwrap();
        assert_eq!(c.pg.get_connect_timeout(), Some(&DEFAULT_CONNECT_TIMEOUT));
        assert!(
            c.pg.get_options()
                .unwrap()
                .contains("statement_timeout=3600000"),
            "{:?}",
            c.pg.get_options()
        );
        assert_eq!(c.pool_timeout, DEFAULT_POOL_TIMEOUT);
        let c = config(&[
            ("url", "postgres://u@localhost/x"),
            ("statement_timeout", "90s"),
            ("connect_timeout", "2s"),
            ("pool_timeout", "5s"),
        ])
        .unwrap();
        assert!(
            c.pg.get_options()
                .unwrap()
                .contains("statement_timeout=90000")
        );
        assert_eq!(c.pg.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(c.pool_timeout, Duration::from_secs(5));
        let err = config(&[
            ("url", "postgres://u@localhost/x"),
            ("statement_timeout", "99999999999999999999999"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("statement_timeout"), "{err}");
    }
}
