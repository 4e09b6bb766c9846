//! Celery's `rpc://` result backend: each state is a message to the caller's own reply
//! queue (the task message's `reply_to`, which the caller declared), through the default
//! exchange, with the task's id as `correlation_id` and the result meta as a JSON body —
//! what a Celery worker sends and what the caller's `AsyncResult.get()` consumes.
//!
//! A result is published with publisher confirms: [`RpcResults::store`] returns once the
//! broker has it. It is `mandatory`: when the reply queue is gone (the caller exited; its
//! queue is deleted with it), the broker returns it and taskd logs that no one was left to
//! read it, as there is no other place a `rpc://` result could go.

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Mutex;

use crate::celery::message::ResultTo;
use crate::celery::result::{CeleryState, ResultSink};

/// The `rpc://` backend over the AMQP broker at `uri`.
pub struct RpcResults {
    uri: lapin::uri::AMQPUri,
    addr: String,
    /// The connection and its confirming channel, opened on first use and again after a
    /// failure.
    link: Mutex<Option<(Connection, Channel)>>,
}

impl RpcResults {
    pub fn new(uri: lapin::uri::AMQPUri) -> RpcResults {
        RpcResults {
            addr: super::describe(&uri),
            uri,
            link: Mutex::new(None),
        }
    }

    async fn open(&self) -> lapin::Result<(Connection, Channel)> {
        let conn = super::connect(&self.uri, "celery rpc results").await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok((conn, ch))
    }

    /// Publish every reply, then wait for the broker's confirms of all of them (one round
    /// trip for the lot); for each, why it was not delivered, if it was not.
    ///
    /// The publishes are started together: each one's frames go to the connection's I/O
    /// thread at once, and that thread writes them all in one go (awaiting each publish in
    /// turn cost a hand-over to that thread and back per reply).
    async fn publish_all(
        &self,
        ch: &Channel,
        replies: &[(&str, &str, &str, String)],
    ) -> Result<Vec<Option<String>>, lapin::Error> {
        let publishes = replies.iter().map(|(_, reply_to, correlation_id, body)| {
            ch.basic_publish(
                "".into(),
                (*reply_to).into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body.as_bytes(),
                reply_properties(correlation_id),
            )
        });
        let confirms = futures_util::future::try_join_all(publishes).await?;
        let mut out = Vec::with_capacity(confirms.len());
        for c in confirms {
            out.push(match c.await? {
                Confirmation::Ack(Some(returned)) => Some(returned.reply_text.to_string()),
                Confirmation::Nack(_) => Some("the broker refused it (nack)".into()),
                _ => None,
            });
        }
        Ok(out)
    }
}

/// A reply's properties: what a Celery worker sets on its `rpc://` replies.
fn reply_properties(correlation_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_correlation_id(correlation_id.into())
        .with_delivery_mode(2)
        .with_priority(0)
}

#[async_trait]
impl ResultSink for RpcResults {
    async fn store_many(&self, items: &[(ResultTo, CeleryState)]) -> Result<(), String> {
        let now = crate::model::now_ms();
        // (task id, reply queue, correlation id, body)
        let replies: Vec<(&str, &str, &str, String)> = items
            .iter()
            .filter_map(|(to, state)| {
                let reply_to = to.reply_to.as_deref().filter(|r| !r.is_empty())?;
                let correlation_id = to.correlation_id.as_deref().unwrap_or(&to.id);
                Some((
                    to.id.as_str(),
                    reply_to,
                    correlation_id,
                    state.meta(&to.id, now).to_string(),
                ))
            })
            .collect();
        if replies.is_empty() {
            return Ok(());
        }
        let mut link = self.link.lock().await;
        // One retry on a fresh connection: the one kept may have died since the last use.
        for attempt in 0..2 {
            if link.is_none() {
                *link = Some(
                    self.open()
                        .await
                        .map_err(|e| format!("rpc:// over {}: {e}", self.addr))?,
                );
            }
            let (_, ch) = link.as_ref().expect("opened above");
            match self.publish_all(ch, &replies).await {
                Ok(answers) => {
                    for ((task, reply_to, _, _), why) in replies.iter().zip(answers) {
                        if let Some(why) = why {
                            tracing::warn!(
                                task,
                                reply_to,
                                why,
                                "Celery rpc:// result not delivered: the caller's reply queue is gone"
                            );
                        }
                    }
                    return Ok(());
                }
                Err(e) => {
                    *link = None;
                    if attempt == 1 {
                        return Err(format!("rpc:// over {}: {e}", self.addr));
                    }
                }
            }
        }
        Ok(())
    }

    async fn store(&self, to: &ResultTo, state: &CeleryState) -> Result<(), String> {
        // One reply is a batch of one: the same publish, confirm and retry.
        self.store_many(&[(to.clone(), state.clone())]).await
    }

    fn describe(&self) -> String {
        format!("rpc:// over {}", self.addr)
    }
}
