//! Wake-ups (rule 8) by `LISTEN`/`NOTIFY`: one channel per store (named after its schema),
//! whose payload says what changed (`work`, `sched`, `cancel`, `pause`, `schedules`).
//! Triggers and operations raise them inside their transactions; PostgreSQL delivers each
//! distinct one once per transaction, at commit. The listening connection is outside the
//! pool; when it is lost it is opened again with backoff, and every signal is raised once
//! then (a notification sent meanwhile was missed). The daemon's ticks remain the safety
//! net.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::AsyncMessage;

use super::conn::{tls, unreachable_at, Settings};
use crate::backoff::Doubling;
use crate::broker::{Result, Wakeups};

fn raise(wakeups: &Wakeups, what: &str) {
    let w = wakeups;
    match what {
        "work" => w.work.notify_one(),
        "cancel" => w.cancel.notify_one(),
        "pause" => w.pause.notify_one(),
        "sched" => w.sched.notify_one(),
        "schedules" => w.schedules.notify_one(),
        _ => {}
    }
}

fn raise_all(wakeups: &Wakeups) {
    for what in ["work", "cancel", "pause", "sched", "schedules"] {
        raise(wakeups, what);
    }
}

type Messages = futures_util::stream::BoxStream<
    'static,
    std::result::Result<AsyncMessage, tokio_postgres::Error>,
>;

/// Connect and LISTEN: the client (kept while its connection is read), the stream of the
/// connection's messages, and those that arrived while LISTEN ran.
async fn listen_once(
    settings: &Settings,
) -> Result<(tokio_postgres::Client, Messages, Vec<AsyncMessage>)> {
    let (client, mut conn) = settings
        .config
        .connect(tls(settings)?)
        .await
        .map_err(|e| unreachable_at(&settings.addr, &e))?;
    let mut messages: Messages =
        futures_util::stream::poll_fn(move |cx| conn.poll_message(cx)).boxed();
    // The connection makes progress only while its messages are read: LISTEN runs while
    // the stream is polled.
    let mut early = Vec::new();
    {
        let sql = format!("LISTEN {}", settings.schema);
        let listen = client.batch_execute(&sql);
        tokio::pin!(listen);
        loop {
            tokio::select! {
                done = &mut listen => {
                    done.map_err(|e| unreachable_at(&settings.addr, &e))?;
                    break;
                }
                m = messages.next() => match m {
                    Some(Ok(m)) => early.push(m),
                    Some(Err(e)) => return Err(unreachable_at(&settings.addr, &e)),
                    None => return Err(unreachable_at(&settings.addr, &"the connection closed")),
                },
            }
        }
    }
    Ok((client, messages, early))
}

pub(super) async fn subscribe(settings: Settings) -> Result<Wakeups> {
    let wakeups = Wakeups::default();
    let first = listen_once(&settings).await?;
    let w = wakeups.clone();
    tokio::spawn(async move {
        let (mut _client, mut messages, early) = first;
        for m in early {
            if let AsyncMessage::Notification(n) = m {
                raise(&w, n.payload());
            }
        }
        loop {
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(n)) => raise(&w, n.payload()),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            tracing::warn!(broker = %settings.addr, "lost the PostgreSQL connection that listens for wake-ups; reconnecting");
            let mut delay = Doubling::new(Duration::from_millis(100), Duration::from_secs(5));
            (_client, messages) = loop {
                tokio::time::sleep(delay.next_delay()).await;
                match listen_once(&settings).await {
                    Ok((c, m, _)) => break (c, m),
                    Err(e) => tracing::debug!(error = %e, "listening for wake-ups again failed"),
                }
            };
            tracing::info!(broker = %settings.addr, "listening for wake-ups again");
            raise_all(&w);
        }
    });
    Ok(wakeups)
}
