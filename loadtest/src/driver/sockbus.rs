//! The sockbus driver: the project's own SDK (`sockbus-client`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use sockbus_client::{Client, ConnectOptions, Message, Subscriber};

use super::{Conn, ConnSettings, Driver, Incoming, Sub};

pub struct SockbusDriver {
    url: String,
}

impl SockbusDriver {
    pub fn new(url: &str) -> Self {
        SockbusDriver {
            url: url.to_string(),
        }
    }
}

impl Driver for SockbusDriver {
    type Conn = SockbusConn;

    async fn connect(&self, s: ConnSettings) -> anyhow::Result<SockbusConn> {
        let mut opts = ConnectOptions::new();
        if let Some(ca) = super::tls_ca() {
            opts = opts.tls_ca(ca);
        }
        let client = opts
            .name(s.name.clone())
            .subscription_capacity(s.sub_capacity)
            .subscription_pending_bytes(s.sub_pending_bytes)
            // A load test that loses its broker should fail, not retry forever.
            .max_reconnects(0)
            .connect(super::pick_server(&self.url, s.server))
            .await
            .with_context(|| format!("cannot connect to {}", super::redact_url(&self.url)))?;
        Ok(SockbusConn { client })
    }
}

#[derive(Clone)]
pub struct SockbusConn {
    client: Client,
}

impl Incoming for Message {
    fn payload(&self) -> &[u8] {
        &self.payload
    }
}

impl Sub for Subscriber {
    type Msg = Message;
    async fn next(&mut self) -> Option<Message> {
        Subscriber::next(self).await
    }
    fn dropped(&self) -> u64 {
        Subscriber::dropped(self)
    }
}

impl Conn for SockbusConn {
    type Topic = Arc<str>;
    type Msg = Message;
    type Sub = Subscriber;

    fn topic(&self, subject: &str) -> Arc<str> {
        Arc::from(subject)
    }

    async fn publish(&self, topic: &Arc<str>, payload: Bytes) -> anyhow::Result<()> {
        Ok(self.client.publish(topic, &payload).await?)
    }

    async fn subscribe(&self, subject: &str, queue: Option<&str>) -> anyhow::Result<Subscriber> {
        Ok(match queue {
            Some(q) => self.client.queue_subscribe(subject, q).await?,
            None => self.client.subscribe(subject).await?,
        })
    }

    async fn request(
        &self,
        topic: &Arc<str>,
        payload: Bytes,
        timeout: Duration,
    ) -> anyhow::Result<Bytes> {
        Ok(self
            .client
            .request_timeout(topic, &payload, timeout)
            .await?
            .payload)
    }

    async fn respond(&self, request: &Message, payload: Bytes) -> anyhow::Result<()> {
        match request.reply() {
            Some(reply) => Ok(self.client.publish(reply, &payload).await?),
            None => Ok(()),
        }
    }

    async fn sync(&self) -> anyhow::Result<()> {
        Ok(self.client.flush().await?)
    }
}

impl super::Durable for SockbusConn {
    type Ack = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

    async fn create_stream(&self, name: &str, subject: &str, replicas: u32) -> anyhow::Result<()> {
        // fsync = always, the default: every ack means the data is on disk
        // (with replicas: on a quorum's disks).
        let mut cfg = sockbus_client::streams::StreamConfig::new(name, [subject]);
        cfg.replicas = (replicas > 1).then_some(replicas);
        self.client
            .stream_add(&cfg)
            .await
            .with_context(|| format!("cannot create stream {name}"))?;
        Ok(())
    }

    async fn publish_acked(&self, topic: &Arc<str>, payload: Bytes) -> anyhow::Result<Self::Ack> {
        // A durable publish is a request; run it as a task so many acks are
        // in flight at once, as JetStream's async publish allows.
        let (client, topic) = (self.client.clone(), topic.clone());
        let task = tokio::spawn(async move { client.publish_durable(&topic, &payload).await });
        Ok(Box::pin(async move {
            task.await??;
            Ok(())
        }))
    }

    async fn read_stream(&self, name: &str, count: u64, idle: Duration) -> anyhow::Result<u64> {
        use sockbus_client::streams::ConsumerConfig;
        let mut consumer = self
            .client
            .consumer(name, ConsumerConfig::ephemeral().no_ack(true).batch(1000))
            .await?;
        let mut n = 0;
        while n < count {
            match consumer.next_timeout(idle).await? {
                Some(_) => n += 1,
                None => break,
            }
        }
        let _ = consumer.close().await;
        Ok(n)
    }

    async fn delete_stream(&self, name: &str) -> anyhow::Result<()> {
        self.client.stream_delete(name).await?;
        Ok(())
    }
}
