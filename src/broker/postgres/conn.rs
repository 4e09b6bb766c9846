//! Connections: the broker URL (libpq's `postgres://` form, with taskd's own parameters
//! taken out), TLS through rustls, the pool, the store's clock, and PostgreSQL's errors
//! turned into [`BrokerError`]s.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use crate::config::postgres_url::{Settings, CONNECT_TIMEOUT};

/// A difference from the server's clock up to this is taken as none (rule 9's clock).
const SKEW_IGNORED_MS: i64 = 50;
use crate::broker::BrokerError;
use crate::model::now_ms;

/// The TLS connector: rustls with the built-in roots, plus `sslrootcert`'s.
pub(super) fn tls(
    settings: &Settings,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, BrokerError> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &settings.root_cert {
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| BrokerError::Unavailable(format!("sslrootcert {path}: {e}")))?;
        for c in certs {
            let c = c.map_err(|e| BrokerError::Unavailable(format!("sslrootcert {path}: {e}")))?;
            roots
                .add(c)
                .map_err(|e| BrokerError::Unavailable(format!("sslrootcert {path}: {e}")))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| BrokerError::Unavailable(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A pool of `settings.pool_size` connections, handed out last in, first out: an
/// operation takes the connection given back most recently. PostgreSQL plans a prepared
/// statement anew on each connection (five custom plans before it may keep a generic one,
/// 0.6-1.6 ms of the server's CPU each for the claim and the finish), so a few connections
/// kept busy plan the hot statements once each where connections handed out in turn would
/// all plan them; the others stay idle until the load needs them. Nothing depends on the
/// order: every operation takes any connection (`LISTEN` has its own, outside the pool),
/// and an idle connection found closed when taken is replaced (`RecyclingMethod::Fast`).
pub(super) fn pool(settings: &Settings) -> Result<deadpool_postgres::Pool, BrokerError> {
    let manager = deadpool_postgres::Manager::from_config(
        settings.config.clone(),
        tls(settings)?,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(settings.pool_size)
        .queue_mode(deadpool_postgres::QueueMode::Lifo)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(CONNECT_TIMEOUT + Duration::from_secs(1)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| BrokerError::Storage(format!("the connection pool: {e}")))
}

/// One connection outside the pool (migrations, LISTEN).
pub(super) async fn connect(settings: &Settings) -> Result<tokio_postgres::Client, BrokerError> {
    let (client, conn) = settings
        .config
        .connect(tls(settings)?)
        .await
        .map_err(|e| unreachable_at(&settings.addr, &e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The store cannot be reached: what the CLI reports with exit code 3.
pub(super) fn unreachable_at(addr: &str, error: &dyn std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("cannot reach PostgreSQL at {addr}: {error}"))
}

/// The text of a PostgreSQL error: the server's message (and detail), or the client's.
pub(super) fn text(error: &tokio_postgres::Error) -> String {
    let e = error;
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_string(),
        },
        None => match std::error::Error::source(e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        },
    }
}

/// A PostgreSQL error as the broker reports it: a lost or refused connection, a server
/// shutting down or read-only (a standby after a failover) is `Unavailable` (the caller
/// tries again); a full disk is `Full`; anything else `Storage`.
pub(super) fn pg(error: tokio_postgres::Error) -> BrokerError {
    let e = error;
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return if code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "25006") {
            BrokerError::Unavailable(format!("PostgreSQL: {}", text(&e)))
        } else if code == "53100" {
            BrokerError::Full(format!("PostgreSQL: {}", text(&e)))
        } else {
            BrokerError::Storage(format!("PostgreSQL: {}", text(&e)))
        };
    }
    if e.is_closed() || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>()) {
        return BrokerError::Unavailable(format!(
            "the connection to PostgreSQL was lost: {}",
            text(&e)
        ));
    }
    BrokerError::Storage(format!("PostgreSQL: {}", text(&e)))
}

/// The error of taking a connection from the pool.
pub(super) fn pool_error(addr: &str, error: deadpool_postgres::PoolError) -> BrokerError {
    match error {
        deadpool_postgres::PoolError::Backend(e) => match pg(e) {
            BrokerError::Unavailable(m) | BrokerError::Storage(m) => unreachable_at(addr, &m),
            other => other,
        },
        other => unreachable_at(addr, &other),
    }
}

/// The store's clock (rule 9): the local clock plus the offset measured against the
/// server's when connecting, so that nodes with skewed clocks agree on lease expiry and
/// due times without a round trip per reading.
#[derive(Default)]
pub(super) struct Clock(AtomicI64);

impl Clock {
    pub fn now(&self) -> i64 {
        now_ms() + self.0.load(Ordering::Relaxed)
    }

    /// Measure the offset over `client` (half the round trip is taken as the way back).
    pub async fn sync(&self, client: &tokio_postgres::Client) -> Result<(), BrokerError> {
        let before = now_ms();
        let server: i64 = client
            .query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                &[],
            )
            .await
            .map_err(pg)?
            .get(0);
        let after = now_ms();
        let offset = server - (before + after) / 2;
        // Within the measurement's own error (and NTP's usual few ms) the clocks agree: the
        // local clock is then used as it is, so that times a caller computed from it (a
        // run-at, a retry's time) read back unchanged.
        let offset = if offset.abs() <= SKEW_IGNORED_MS.max(after - before) {
            0
        } else {
            offset
        };
        self.0.store(offset, Ordering::Relaxed);
        Ok(())
    }
}
