//! A `postgres://` broker URL, read as the PostgreSQL broker will read it: libpq's
//! parameters through `tokio-postgres`, and taskd's own taken out first. Here so that the
//! config reports a bad URL with its position, and the broker connects with the result.

use std::str::FromStr;
use std::time::Duration;

/// The schema when the URL names none.
pub const DEFAULT_SCHEMA: &str = "taskd";
/// Connections per client when the URL sets no `pool_size`.
pub const DEFAULT_POOL: usize = 8;
/// Every statement's limit when the URL sets no `statement_timeout`.
pub const DEFAULT_STATEMENT_TIMEOUT: &str = "30s";
/// How long opening a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a `postgres://` URL says, ready to connect.
#[derive(Clone)]
pub struct Settings {
    pub config: tokio_postgres::Config,
    pub schema: String,
    pub pool_size: usize,
    /// `host:port/database`, for messages (never the password).
    pub addr: String,
    /// A PEM file of CA certificates to trust besides the built-in roots (`sslrootcert`).
    pub root_cert: Option<String>,
}

/// Reads a `postgres://` or `postgresql://` URL: libpq's parameters (host, port, user,
/// password, dbname, `sslmode`, `options`, `application_name`, `connect_timeout`, ...) as
/// `tokio-postgres` reads them, plus taskd's own: `schema` (default `taskd`), `pool_size`
/// (default 8), `statement_timeout` (default `30s`) and `sslrootcert`. The error never
/// repeats the URL, which may hold a password.
pub fn parse_url(url: &str) -> Result<Settings, String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut schema = DEFAULT_SCHEMA.to_string();
    let mut pool_size = DEFAULT_POOL;
    let mut timeout = DEFAULT_STATEMENT_TIMEOUT.to_string();
    let mut root_cert = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "schema" => {
                if v.is_empty()
                    || v.len() > 63
                    || !v.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                {
                    return Err(format!(
                        "`schema={v}` is not a schema name taskd uses: lower-case ASCII letters, digits and `_`, starting with a letter or `_`, at most 63"
                    ));
                }
                schema = v.to_string();
            }
            "pool_size" => {
                pool_size = match v.parse::<usize>() {
                    Ok(n) if (1..=1000).contains(&n) => n,
                    _ => {
                        return Err(format!(
                            "`pool_size={v}` is not a number of connections from 1 to 1000"
                        ))
                    }
                }
            }
            "statement_timeout" => {
                let ok = humantime::parse_duration(v).is_ok() || v.parse::<u64>().is_ok();
                if !ok {
                    return Err(format!(
                        "`statement_timeout={v}` is not a duration (e.g. `30s`, `500ms`, or 0 for none)"
                    ));
                }
                timeout = v.to_string();
            }
            "sslrootcert" => root_cert = Some(v.to_string()),
            _ => rest.push(pair),
        }
    }
    let plain = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let mut config = tokio_postgres::Config::from_str(&plain)
        .map_err(|e| format!("the PostgreSQL URL is invalid: {e}").replace(url, "<url>"))?;
    // A statement timeout in ms: PostgreSQL reads a bare number as ms.
    let timeout_ms = match timeout.parse::<u64>() {
        Ok(ms) => ms,
        Err(_) => humantime::parse_duration(&timeout)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(30_000),
    };
    let options = format!(
        "{} -c search_path={schema},pg_catalog -c statement_timeout={timeout_ms}",
        config.get_options().unwrap_or("")
    );
    config.options(options.trim());
    if config.get_application_name().is_none() {
        config.application_name("taskd");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.keepalives_idle(Duration::from_secs(30));
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres")
        .to_string();
    Ok(Settings {
        addr: format!("{host}:{port}/{db}"),
        config,
        schema,
        pool_size,
        root_cert,
    })
}
