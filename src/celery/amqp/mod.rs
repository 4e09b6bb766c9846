//! The AMQP 0-9-1 transport (RabbitMQ): Celery's messages consumed from the queues the
//! producers declared, each acknowledged (`basic.ack`) only once [`Bridge::ingest`] returned
//! (the task is durable in taskd's store, or its refusal is written); Celery's revoke
//! broadcasts read from the `celery.pidbox` fanout exchange; and the `rpc://` result backend
//! ([`rpc::RpcResults`]).
//!
//! What it declares: nothing on the task queues (a passive declare checks each one exists;
//! the producers declared it with their own arguments, which taskd must not contradict).
//! For revokes it declares what a Celery worker declares: the `celery.pidbox` fanout
//! exchange (with kombu's own parameters, so the declare agrees with every producer's) and
//! a queue of its own bound to it.
//!
//! Several nodes may consume the same queues: RabbitMQ hands each message to one consumer
//! and, when a consumer's connection ends before its ack, delivers the message again to
//! another. A message delivered twice becomes one task (the task's id is the Celery id).

pub mod rpc;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::{Bridge, Delivery, PriorityOrder};
use crate::backoff::Doubling;

/// At most this many messages in one store write; with a prefetch above it, RabbitMQ keeps
/// delivering while a batch is being stored.
const MAX_BATCH: usize = 1000;

/// The fanout exchange Celery's `app.control` broadcasts on (`revoke`, `ping`, …).
pub const PIDBOX: &str = "celery.pidbox";

/// A broker address as AMQP clients take it, from a Celery broker URL.
///
/// kombu reads the URL's path as the virtual host with a different rule than most AMQP
/// clients: an empty path is the vhost `/` (`amqp://host:5672/` and `amqp://host:5672//`
/// both mean `/`), where others read `/` as the empty vhost. The `pyamqp://` and
/// `librabbitmq://` schemes of kombu are AMQP.
pub fn broker_uri(url: &str) -> Result<lapin::uri::AMQPUri, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "an AMQP URL starts with amqp:// or amqps://".to_string())?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "amqp" | "pyamqp" | "librabbitmq" => "amqp",
        "amqps" => "amqps",
        other => {
            return Err(format!(
                "`{other}://` is not an AMQP URL (amqp:// or amqps://)"
            ))
        }
    };
    let text = format!("{scheme}://{rest}");
    let mut uri: lapin::uri::AMQPUri = text
        .parse()
        .map_err(|e: String| format!("invalid AMQP URL: {}", e.replace(url, "<url>")))?;
    if uri.vhost.is_empty() {
        uri.vhost = "/".to_string();
    }
    Ok(uri)
}

/// For people and logs: the broker's address without its password.
pub fn describe(uri: &lapin::uri::AMQPUri) -> String {
    let vhost = if uri.vhost == "/" {
        "/".to_string()
    } else {
        format!("/{}", uri.vhost)
    };
    format!(
        "{}://{}@{}:{}{}",
        if matches!(uri.scheme, lapin::uri::AMQPScheme::AMQPS) {
            "amqps"
        } else {
            "amqp"
        },
        uri.authority.userinfo.username,
        uri.authority.host,
        uri.authority.port,
        vhost
    )
}

/// Connect, naming the connection after this node (RabbitMQ shows it in its tools).
pub(crate) async fn connect(uri: &lapin::uri::AMQPUri, role: &str) -> lapin::Result<Connection> {
    let host = crate::model::host_name().unwrap_or("localhost");
    let props = ConnectionProperties::default()
        .with_connection_name(format!("taskd {role} on {host}").into());
    Connection::connect_uri(uri.clone(), props).await
}

/// The transport's settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub uri: lapin::uri::AMQPUri,
    /// The Celery queues consumed.
    pub queues: Vec<String>,
    /// At most this many unacknowledged messages per queue (`basic.qos`).
    pub prefetch: u16,
}

/// Consume until `stop`: connect, consume, and on any broker error log it (naming the
/// address), wait (doubling from 1 s up to 30 s) and connect again. Messages delivered and
/// not yet acknowledged when a connection ends are delivered again by RabbitMQ.
pub async fn run(bridge: Arc<Bridge>, settings: Settings, stop: CancellationToken) {
    let addr = describe(&settings.uri);
    let mut backoff = Doubling::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        match session(&bridge, &settings, &addr, &stop).await {
            Ok(()) => return,
            Err(SessionEnd { error, consumed }) => {
                if consumed {
                    backoff.reset();
                }
                let wait = backoff.next_delay();
                tracing::warn!(
                    broker = %addr,
                    error = %error,
                    retry_in = ?wait,
                    "Celery bridge: lost the AMQP broker at {addr}; connecting again"
                );
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

struct SessionEnd {
    error: String,
    /// It got as far as consuming (the next failure waits the shortest delay again).
    consumed: bool,
}

fn fail(consumed: bool) -> impl Fn(lapin::Error) -> SessionEnd {
    move |e| SessionEnd {
        error: e.to_string(),
        consumed,
    }
}

type Incomings = futures_util::stream::SelectAll<
    futures_util::stream::BoxStream<'static, lapin::Result<Incoming>>,
>;

/// One connection's life: `Ok` when `stop` ended it. The messages being ingested when `stop`
/// come are finished and acknowledged first; the others delivered to taskd go back to their
/// queues when the connection closes.
///
/// Ingest is a pipeline two batches deep: while one batch is being stored (the SQLite writer
/// thread, its commit waiting for the disk), the deliveries received meanwhile are taken
/// and read as the next batch, whose store is queued behind it. Batches are answered
/// (acknowledged) strictly in the order they were taken.
async fn session(
    bridge: &Arc<Bridge>,
    settings: &Settings,
    addr: &str,
    stop: &CancellationToken,
) -> Result<(), SessionEnd> {
    let (conn, mut all) = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        r = subscribe(bridge, settings) => r?,
    };
    tracing::info!(
        broker = %addr,
        queues = ?settings.queues,
        prefetch = settings.prefetch,
        results = %bridge.sink.as_ref().map_or_else(|| "none".to_string(), |s| s.describe()),
        "Celery bridge: consuming from the AMQP broker at {addr}"
    );
    let mut failures = Doubling::new(Duration::from_millis(100), Duration::from_secs(10));
    let most = batch_limit(settings);
    let mut pending: Option<InFlight> = None;
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                if let Some(p) = pending.take() {
                    answer(bridge, p, &mut failures, stop).await?;
                }
                let _ = conn.close(200, "taskd stops".into()).await;
                return Ok(());
            }
            done = wait(&mut pending) => {
                let p = pending.take().expect("a batch in flight");
                answer_with(bridge, p, done, &mut failures, stop).await?;
                continue;
            }
            n = all.next() => n,
        };
        let incoming = match next {
            None => {
                return Err(SessionEnd {
                    error: "the broker cancelled taskd's consumers".into(),
                    consumed: true,
                })
            }
            Some(Err(e)) => return Err(fail(true)(e)),
            Some(Ok(i)) => i,
        };
        let first = match incoming {
            Incoming::Control(d) => {
                // A revoke is handled once the tasks taken before it are stored, so that it
                // finds them.
                if let Some(p) = pending.take() {
                    answer(bridge, p, &mut failures, stop).await?;
                }
                control(bridge, d).await?;
                continue;
            }
            Incoming::Task(ch, d) => (ch, d),
        };
        // The deliveries already received, up to the prefetch of every queue, go to the
        // store in one write; control messages among them are handled after it.
        let mut batch = vec![first];
        let mut controls = Vec::new();
        let mut ended = None;
        while batch.len() < most {
            match all.next().now_or_never() {
                Some(Some(Ok(Incoming::Task(ch, d)))) => batch.push((ch, d)),
                Some(Some(Ok(Incoming::Control(d)))) => controls.push(d),
                Some(Some(Err(e))) => {
                    ended = Some(fail(true)(e));
                    break;
                }
                Some(None) => {
                    ended = Some(SessionEnd {
                        error: "the broker cancelled taskd's consumers".into(),
                        consumed: true,
                    });
                    break;
                }
                None => break,
            }
        }
        let next = start(bridge, batch, controls);
        // The batch before it is answered first (acknowledgements go in the order the
        // deliveries came); meanwhile the runtime reads this one and queues its store.
        if let Some(p) = pending.take() {
            answer(bridge, p, &mut failures, stop).await?;
        }
        pending = Some(next);
        if let Some(end) = ended {
            // What is in flight is stored all the same: its messages, not acknowledged on
            // a broken connection, come again as tasks that exist.
            if let Some(p) = pending.take() {
                let _ = answer(bridge, p, &mut failures, stop).await;
            }
            return Err(end);
        }
    }
}

/// The most deliveries in one batch: the prefetch of every queue, at most [`MAX_BATCH`].
fn batch_limit(settings: &Settings) -> usize {
    (usize::from(settings.prefetch).max(1) * settings.queues.len().max(1)).min(MAX_BATCH)
}

type Answers = Vec<Result<super::Ingested, super::IngestError>>;

/// A batch taken and handed to the store, not yet answered to the broker.
struct InFlight {
    batch: Vec<(usize, lapin::message::Delivery)>,
    /// Control messages received with it, handled once it is answered.
    controls: Vec<lapin::message::Delivery>,
    answers: tokio::task::JoinHandle<Answers>,
}

/// Hand `batch` to the bridge (read, then one store write) on a task of its own, so that
/// the batch before it can be answered meanwhile.
fn start(
    bridge: &Arc<Bridge>,
    mut batch: Vec<(usize, lapin::message::Delivery)>,
    controls: Vec<lapin::message::Delivery>,
) -> InFlight {
    let deliveries: Vec<Delivery> = batch.iter_mut().map(|(_, d)| delivery_of(d)).collect();
    let b = bridge.clone();
    let answers = tokio::spawn(async move {
        b.ingest_batch(&deliveries, PriorityOrder::HigherFirst)
            .await
    });
    InFlight {
        batch,
        controls,
        answers,
    }
}

/// The answers of the batch in flight, once they are all in (never, with none in flight).
async fn wait(pending: &mut Option<InFlight>) -> Result<Answers, tokio::task::JoinError> {
    match pending {
        Some(p) => (&mut p.answers).await,
        None => std::future::pending().await,
    }
}

/// Wait for the answers of the batch `in_flight`, then answer its messages to the broker.
async fn answer(
    bridge: &Bridge,
    mut in_flight: InFlight,
    failures: &mut Doubling,
    stop: &CancellationToken,
) -> Result<(), SessionEnd> {
    let done = (&mut in_flight.answers).await;
    answer_with(bridge, in_flight, done, failures, stop).await
}

/// Answer the messages of the batch `in_flight` to the broker from `done`, then handle the
/// control messages that came with them.
async fn answer_with(
    bridge: &Bridge,
    in_flight: InFlight,
    done: Result<Answers, tokio::task::JoinError>,
    failures: &mut Doubling,
    stop: &CancellationToken,
) -> Result<(), SessionEnd> {
    let answers = done.map_err(|e| SessionEnd {
        // Its messages are not acknowledged: the broker delivers them again.
        error: format!("ingesting a batch failed: {e}"),
        consumed: true,
    })?;
    acknowledge(in_flight.batch, answers, failures, stop).await?;
    for d in in_flight.controls {
        control(bridge, d).await?;
    }
    Ok(())
}

/// Acknowledge the messages of `batch` that are durable (`answers`, one per message, in
/// order); the others go back to their queues (`basic.nack` with requeue) after a pause
/// that grows while the failures last (an immediate requeue would come straight back).
///
/// Each consumed queue has a channel of its own, and a channel's deliveries come in the
/// order of their tags; every batch taken before this one is answered already (batches
/// are answered in the order they were taken), so the deliveries of a channel not
/// acknowledged yet up to this batch's last are exactly this batch's. So when every message
/// of a channel is durable, one `basic.ack` with `multiple` of its last tag covers exactly
/// them; otherwise each durable one is acknowledged by its own tag.
async fn acknowledge(
    batch: Vec<(usize, lapin::message::Delivery)>,
    answers: Answers,
    failures: &mut Doubling,
    stop: &CancellationToken,
) -> Result<(), SessionEnd> {
    let mut refused = Vec::new();
    let mut channels: Vec<usize> = batch.iter().map(|(ch, _)| *ch).collect();
    channels.sort_unstable();
    channels.dedup();
    // Per channel: its last delivery, and whether every one of its messages is durable.
    let mut last: Vec<(usize, Option<&lapin::message::Delivery>, bool)> =
        channels.iter().map(|ch| (*ch, None, true)).collect();
    let mut durable = Vec::new();
    for ((ch, d), answer) in batch.iter().zip(answers) {
        let entry = last
            .iter_mut()
            .find(|(c, ..)| c == ch)
            .expect("every channel listed");
        entry.1 = Some(d);
        match answer {
            Ok(outcome) => {
                tracing::debug!(?outcome, queue = %d.routing_key, "Celery message ingested");
                durable.push((*ch, d));
            }
            Err(e) => {
                entry.2 = false;
                refused.push((d, e));
            }
        }
    }
    for (ch, d, all) in &last {
        let Some(d) = d else { continue };
        if *all {
            d.ack(BasicAckOptions { multiple: true })
                .await
                .map_err(fail(true))?;
        } else {
            for (_, d) in durable.iter().filter(|(c, _)| c == ch) {
                d.ack(BasicAckOptions::default())
                    .await
                    .map_err(fail(true))?;
            }
        }
    }
    if refused.is_empty() {
        failures.reset();
        return Ok(());
    }
    let wait = failures.next_delay();
    tracing::warn!(
        error = %refused[0].1,
        count = refused.len(),
        retry_in = ?wait,
        "Celery bridge: could not ingest messages; they go back to their queue"
    );
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(wait) => {}
    }
    for (d, _) in refused {
        d.nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
        .map_err(fail(true))?;
    }
    Ok(())
}

/// A control message (a revoke) handled, then acknowledged.
async fn control(bridge: &Bridge, message: lapin::message::Delivery) -> Result<(), SessionEnd> {
    revoke(bridge, &message.data).await;
    message
        .ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(fail(true))
}

/// Connect, check the queues exist, and consume them and this node's pidbox queue.
async fn subscribe(
    bridge: &Bridge,
    settings: &Settings,
) -> Result<(Connection, Incomings), SessionEnd> {
    let conn = connect(&settings.uri, "celery consumer")
        .await
        .map_err(fail(false))?;
    // A channel for each task queue (so that a `multiple` ack covers only that queue's
    // deliveries), one for revokes: a refused passive declare closes its channel.
    let mut streams: Vec<futures_util::stream::BoxStream<'static, lapin::Result<Incoming>>> =
        Vec::new();
    for (i, q) in settings.queues.iter().enumerate() {
        let tasks = conn.create_channel().await.map_err(fail(false))?;
        tasks
            .basic_qos(settings.prefetch, BasicQosOptions { global: false })
            .await
            .map_err(fail(false))?;
        if let Err(e) = tasks
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            return Err(SessionEnd {
                error: format!(
                    "the Celery queue `{q}` does not exist on the broker yet ({e}); it appears when a producer first sends to it or a Celery worker starts"
                ),
                consumed: false,
            });
        }
        let consumer = tasks
            .basic_consume(
                q.as_str().into(),
                consumer_tag(q).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(fail(false))?;
        streams.push(
            consumer
                .map(move |d| d.map(|d| Incoming::Task(i, d)))
                .boxed(),
        );
    }
    let control = conn.create_channel().await.map_err(fail(false))?;
    let pidbox = pidbox_queue(&control, &bridge.config().path)
        .await
        .map_err(fail(false))?;
    let revokes = control
        .basic_consume(
            pidbox.as_str().into(),
            consumer_tag("pidbox").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(fail(false))?;
    streams.push(revokes.map(|d| d.map(Incoming::Control)).boxed());
    Ok((conn, futures_util::stream::select_all(streams)))
}

enum Incoming {
    /// A task message, with the index of its queue (and channel).
    Task(usize, lapin::message::Delivery),
    Control(lapin::message::Delivery),
}

fn consumer_tag(what: &str) -> String {
    let host = crate::model::host_name().unwrap_or("localhost");
    format!("taskd@{host}:{}:{what}", std::process::id())
}

/// This node's queue on the `celery.pidbox` fanout exchange. The exchange is declared as
/// kombu declares it (fanout, not durable, not auto-deleted) since no Celery client may have
/// yet. The queue is durable and outlives a restart of the node (RabbitMQ deletes it after
/// a day unused): a revoke broadcast while the node restarts waits there.
async fn pidbox_queue(ch: &Channel, config: &std::path::Path) -> lapin::Result<String> {
    ch.exchange_declare(
        PIDBOX.into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: false,
            auto_delete: false,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let name = pidbox_name(config);
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(86_400_000));
    // Celery's own revoke messages expire after their `expires` header; stale ones are
    // still dropped by RabbitMQ after an hour.
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(3_600_000));
    ch.queue_declare(
        name.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    ch.queue_bind(
        name.as_str().into(),
        PIDBOX.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(name)
}

/// `taskd@<host>.<hash of the config file's path>.celery.pidbox`: the same after a restart
/// (the queue keeps what was broadcast meanwhile), another for another taskd installation
/// on the same host.
fn pidbox_name(config: &std::path::Path) -> String {
    let host = crate::model::host_name().unwrap_or("localhost");
    // FNV-1a: stable across builds and Rust versions, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in config.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("taskd@{host}.{:08x}.{PIDBOX}", h as u32)
}

/// A control message: `revoke` cancels the named tasks; every other method (ping, inspect,
/// …) is for Celery workers and is left alone.
async fn revoke(bridge: &Bridge, body: &[u8]) {
    let Ok(msg) = serde_json::from_slice::<Value>(body) else {
        tracing::debug!("Celery control message that is not JSON, ignored");
        return;
    };
    if msg.get("method").and_then(Value::as_str) != Some("revoke") {
        return;
    }
    let args = msg.get("arguments").cloned().unwrap_or(Value::Null);
    let ids: Vec<String> = match args.get("task_id") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    for id in ids {
        let Ok(task) = id.parse() else {
            tracing::debug!(
                id,
                "Celery revoke of an id that is no taskd task id, ignored"
            );
            continue;
        };
        if let Err(e) = bridge.revoke(task).await {
            tracing::warn!(task = %id, error = %e, "Celery revoke: could not cancel the task");
        }
    }
}

/// An AMQP delivery as the bridge reads it. The body is moved out of `message` (not
/// copied): what is left of it is only for acknowledging.
pub fn delivery_of(message: &mut lapin::message::Delivery) -> Delivery {
    let body = std::mem::take(&mut message.data);
    let p = &message.properties;
    let text = |s: &Option<lapin::types::ShortString>| s.as_ref().map(|s| s.as_str().to_string());
    Delivery {
        body,
        content_type: text(p.content_type()),
        content_encoding: text(p.content_encoding()),
        headers: p.headers().as_ref().map(table).unwrap_or_default(),
        priority: *p.priority(),
        reply_to: text(p.reply_to()),
        correlation_id: text(p.correlation_id()),
    }
}

/// AMQP header values as JSON: py-amqp sends `None` as void, strings as long strings,
/// integers, floats, booleans, lists as arrays and dicts as tables.
pub fn table(fields: &FieldTable) -> Map<String, Value> {
    fields
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), value(v)))
        .collect()
}

fn value(amqp: &AMQPValue) -> Value {
    match amqp {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        AMQPValue::Float(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let f = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value).collect()),
        AMQPValue::FieldTable(t) => Value::Object(table(t)),
        AMQPValue::Void => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kombu_urls_name_the_vhost_as_kombu_reads_them() {
        let v = |u: &str| broker_uri(u).map(|u| u.vhost);
        assert_eq!(v("amqp://guest:guest@127.0.0.1:5672//").unwrap(), "/");
        assert_eq!(v("amqp://guest:guest@127.0.0.1:5672/").unwrap(), "/");
        assert_eq!(v("amqp://127.0.0.1").unwrap(), "/");
        assert_eq!(v("amqp://127.0.0.1/%2f").unwrap(), "/");
        assert_eq!(v("pyamqp://u:p@h:5673/prod").unwrap(), "prod");
        let u = broker_uri("amqp://user:s3cret@mq.example:5673/prod").unwrap();
        assert_eq!(u.authority.port, 5673);
        assert_eq!(u.authority.userinfo.password, "s3cret");
        assert_eq!(describe(&u), "amqp://user@mq.example:5673/prod");
        assert!(!describe(&u).contains("s3cret"));
        assert!(broker_uri("redis://h").is_err());
    }

    #[test]
    fn py_amqp_header_values_read_as_json() {
        let mut t = FieldTable::default();
        t.insert("task".into(), AMQPValue::LongString("app.add".into()));
        t.insert("eta".into(), AMQPValue::Void);
        t.insert("retries".into(), AMQPValue::LongLongInt(2));
        t.insert(
            "timelimit".into(),
            AMQPValue::FieldArray(vec![AMQPValue::Double(60.0), AMQPValue::Void].into()),
        );
        t.insert("ignore_result".into(), AMQPValue::Boolean(true));
        let mut stamps = FieldTable::default();
        stamps.insert("k".into(), AMQPValue::ShortShortInt(-1));
        t.insert("stamps".into(), AMQPValue::FieldTable(stamps));
        assert_eq!(
            Value::Object(table(&t)),
            serde_json::json!({"task": "app.add", "eta": null, "retries": 2,
                               "timelimit": [60.0, null], "ignore_result": true,
                               "stamps": {"k": -1}})
        );
    }
}
