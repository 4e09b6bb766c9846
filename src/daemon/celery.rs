//! The Celery bridge in the daemon (`[celery]`): its result sink and transport opened in
//! the background (retried while the Celery broker or backend does not answer), the
//! supervisor's starts and ends handed to it, its loops stopped before the drain.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backoff::Doubling;
use crate::broker::Broker;
use crate::broker::Finish;
use crate::celery::{recorded_state, Bridge, CeleryMeta, CeleryState, ResultSink, ResultTo};
use crate::config::celery::{CeleryBackend, CeleryBroker};
use crate::config::Config;
use crate::model::{AttemptRecord, TaskId, TaskRecord};
use crate::supervisor::{Supervisor, TaskObserver};

/// The bridge's loops, to stop.
pub(super) struct CeleryBridge {
    stop: CancellationToken,
    task: JoinHandle<()>,
    bridge: Arc<tokio::sync::OnceCell<Arc<Bridge>>>,
}

impl CeleryBridge {
    /// Start the bridge of `config`'s `[celery]`, if it has one.
    pub(super) fn start(
        config: &Config,
        broker: &Arc<dyn Broker>,
        metrics: Arc<crate::metrics::Metrics>,
        supervisor: &Arc<Supervisor>,
    ) -> Option<CeleryBridge> {
        let celery = config.celery.clone()?;
        let stop = CancellationToken::new();
        let cell = Arc::new(tokio::sync::OnceCell::new());
        let config = Arc::new(config.clone());
        let broker = broker.clone();
        let supervisor = supervisor.clone();
        let (stop2, cell2) = (stop.clone(), cell.clone());
        let task = tokio::spawn(async move {
            let mut failing = Doubling::new(Duration::from_millis(500), Duration::from_secs(30));
            let sink: Option<Arc<dyn ResultSink>> = loop {
                let opened = match &celery.result_backend {
                    None => Ok(None),
                    #[cfg(feature = "redis")]
                    Some(CeleryBackend::Redis { url }) => {
                        crate::celery::redis::RedisResults::open(url.expose(), celery.result_expires)
                            .await
                            .map(|s| Some(Arc::new(s) as Arc<dyn ResultSink>))
                    }
                    #[cfg(not(feature = "redis"))]
                    Some(CeleryBackend::Redis { .. }) => Err("this taskd was built without Redis support".to_string()),
                    #[cfg(feature = "amqp")]
                    Some(CeleryBackend::Rpc) => match &celery.broker {
                        CeleryBroker::Amqp { url } => crate::celery::amqp::broker_uri(url.expose())
                            .map(|uri| Some(Arc::new(crate::celery::amqp::rpc::RpcResults::new(uri)) as Arc<dyn ResultSink>)),
                        _ => Err("`rpc://` replies over an AMQP broker, and the Celery broker is not one".to_string()),
                    },
                    #[cfg(not(feature = "amqp"))]
                    Some(CeleryBackend::Rpc) => Err("this taskd was built without AMQP support (the `amqp` feature): `rpc://` needs it".to_string()),
                };
                match opened {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::error!(error = %e, "Celery bridge: cannot open the result backend; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(failing.next_delay()) => {}
                            _ = stop2.cancelled() => return,
                        }
                    }
                }
            };
            let bridge = Arc::new(Bridge::new(config, broker, sink, metrics));
            let _ = cell2.set(bridge.clone());
            let (ends, ended) = tokio::sync::mpsc::unbounded_channel();
            // Runs until the supervisor drops the observer (the daemon ends).
            tokio::spawn(write_ends(bridge.clone(), ended));
            supervisor.set_observer(Arc::new(Observer {
                bridge: bridge.clone(),
                ends,
            }));
            let sweep = {
                let (b, s) = (bridge.clone(), stop2.clone());
                tokio::spawn(async move { b.sweep(s).await })
            };
            match &celery.broker {
                #[cfg(feature = "redis")]
                CeleryBroker::Redis { url } => {
                    failing.reset();
                    let transport = loop {
                        match crate::celery::redis::RedisTransport::open(
                            url.expose(),
                            celery.queues.clone(),
                            celery.visibility_timeout,
                        )
                        .await
                        {
                            Ok(t) => break Arc::new(t),
                            Err(e) => {
                                tracing::error!(error = %e, "Celery bridge: cannot reach the Celery broker; retrying");
                                tokio::select! {
                                    _ = tokio::time::sleep(failing.next_delay()) => {}
                                    _ = stop2.cancelled() => return,
                                }
                            }
                        }
                    };
                    tracing::info!(
                        broker = %transport.describe(),
                        queues = ?celery.queues,
                        results = %bridge_results(&bridge),
                        "Celery bridge: consuming"
                    );
                    transport.run(bridge, stop2).await;
                }
                #[cfg(not(feature = "redis"))]
                CeleryBroker::Redis { .. } => {
                    tracing::error!("Celery bridge: this taskd was built without Redis support");
                }
                #[cfg(feature = "amqp")]
                CeleryBroker::Amqp { url } => match crate::celery::amqp::broker_uri(url.expose()) {
                    Ok(uri) => {
                        let settings = crate::celery::amqp::Settings {
                            uri,
                            queues: celery.queues.clone(),
                            prefetch: celery.prefetch,
                        };
                        crate::celery::amqp::run(bridge, settings, stop2).await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "Celery bridge: cannot use the AMQP broker")
                    }
                },
                #[cfg(not(feature = "amqp"))]
                CeleryBroker::Amqp { .. } => {
                    tracing::error!("Celery bridge: this taskd was built without AMQP support (the `amqp` feature)");
                }
            }
            let _ = sweep.await;
        });
        Some(CeleryBridge {
            stop,
            task,
            bridge: cell,
        })
    }

    /// Use `config` from now on (a reload).
    pub(super) fn reload(&self, config: &Config) {
        if let Some(b) = self.bridge.get() {
            b.set_config(Arc::new(config.clone()));
        }
    }

    /// Stop taking messages: the batch being ingested is finished and acknowledged first
    /// (for at most a few seconds). Results of tasks still ending are written afterwards.
    pub(super) async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

#[cfg(any(feature = "redis", feature = "amqp"))]
fn bridge_results(bridge: &Bridge) -> String {
    bridge
        .sink
        .as_ref()
        .map_or_else(|| "none".to_string(), |s| s.describe())
}

/// The supervisor's starts and ends of Celery tasks: a start written by the bridge on a
/// task of its own, the ends handed to [`write_ends`].
struct Observer {
    bridge: Arc<Bridge>,
    ends: tokio::sync::mpsc::UnboundedSender<End>,
}

/// An end for [`write_ends`]: its final state already known from the attempt the broker
/// recorded, or to be read from the store.
enum End {
    Known(ResultTo, CeleryState),
    Read(TaskId),
}

/// At most this many ends in one write.
const END_BATCH: usize = 500;

/// The final states of the tasks that end, written in batches: the ends that arrived while
/// the last batch was being written make the next (those not known already read from the
/// store together, all written in one round trip to the result backend). A batch that
/// cannot be written is tried again a few times; the sweep catches what is still missed.
async fn write_ends(bridge: Arc<Bridge>, mut ended: tokio::sync::mpsc::UnboundedReceiver<End>) {
    let mut batch = Vec::with_capacity(END_BATCH);
    let mut items = Vec::with_capacity(END_BATCH);
    let mut read = Vec::new();
    while ended.recv_many(&mut batch, END_BATCH).await > 0 {
        for end in batch.drain(..) {
            match end {
                End::Known(to, state) => items.push((to, state)),
                End::Read(id) => read.push(id),
            }
        }
        let mut failing = Doubling::new(Duration::from_millis(200), Duration::from_secs(5));
        for _ in 0..5 {
            let written = async {
                if !read.is_empty() {
                    items.extend(bridge.final_states(&read).await?);
                    read.clear();
                }
                bridge.write_final(&items).await
            };
            match written.await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(count = items.len() + read.len(), error = %e, "Celery bridge: cannot write the final states of tasks; retrying");
                    tokio::time::sleep(failing.next_delay()).await;
                }
            }
        }
        items.clear();
        read.clear();
    }
}

impl TaskObserver for Observer {
    fn watches_start(&self, task: &TaskRecord) -> bool {
        CeleryMeta::tracks_started(&task.payload)
    }

    /// Called only for the tasks [`Self::watches_start`] chose: those with `track_started`.
    fn started(&self, task: &TaskRecord, pid: u32) {
        let (bridge, task) = (self.bridge.clone(), task.clone());
        tokio::spawn(async move { bridge.started(&task, pid).await });
    }

    fn ended(&self, task: &TaskRecord, recorded: Option<(&AttemptRecord, Finish)>) {
        let Some(to) = CeleryMeta::result_to(&task.payload) else {
            return;
        };
        let end = match recorded.and_then(|(attempt, finish)| recorded_state(attempt, finish)) {
            Some(state) => End::Known(to, state),
            None => End::Read(task.id),
        };
        let _ = self.ends.send(end);
    }

    fn expired(&self, id: TaskId) {
        let _ = self.ends.send(End::Read(id));
    }
}
