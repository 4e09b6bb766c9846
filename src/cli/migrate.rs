//! `taskd migrate`: bring the store's schema up to this taskd's version, from a deploy step
//! before the daemons are restarted (`taskd start` does the same when it opens the store).
//! A re-run changes nothing; a schema newer than this taskd is refused, saying so.

use std::path::PathBuf;

use super::{exit, load_config, open_broker};
#[cfg(feature = "postgres")]
use crate::config::BrokerUrl;

#[derive(clap::Args, Debug)]
pub struct MigrateArgs {}

pub async fn run(config: Option<PathBuf>, _args: MigrateArgs) -> anyhow::Result<u8> {
    let config = load_config(config)?;
    match &config.broker {
        #[cfg(feature = "postgres")]
        BrokerUrl::Postgres { url } => {
            let settings = crate::broker::postgres::parse_url(url.expose())
                .map_err(crate::broker::BrokerError::Unavailable)?;
            let done = crate::broker::postgres::PgBroker::migrate(url.expose()).await?;
            if done.before == done.after {
                println!(
                    "schema `{}` at {} is at version {}, the newest this taskd knows: nothing to do",
                    settings.schema, settings.addr, done.after
                );
            } else {
                println!(
                    "schema `{}` at {}: version {} → {} ({} migration{} applied)",
                    settings.schema,
                    settings.addr,
                    done.before,
                    done.after,
                    done.after - done.before,
                    if done.after - done.before == 1 {
                        ""
                    } else {
                        "s"
                    }
                );
            }
        }
        other => {
            // The embedded store migrates when it is opened; Redis keeps no schema.
            open_broker(&config).await?;
            println!(
                "{}: the store is at the newest schema this taskd knows",
                super::check::broker_text(other)
            );
        }
    }
    Ok(exit::OK)
}
