//! The NATS driver: the async-nats crate, configured like the sockbus one
//! (buffers sized to the window, no reconnects).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::{Client, ConnectOptions, Event, Message, Subject, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;

use super::{Conn, ConnSettings, Driver, Durable, Incoming, Sub};

pub struct NatsDriver {
    url: String,
}

impl NatsDriver {
    pub fn new(url: &str) -> Self {
        NatsDriver {
            url: url.to_string(),
        }
    }
}

impl Driver for NatsDriver {
    type Conn = NatsConn;

    async fn connect(&self, s: ConnSettings) -> anyhow::Result<NatsConn> {
        let drops = Arc::new(AtomicU64::new(0));
        let d = drops.clone();
        let mut opts = ConnectOptions::new();
        if let Some(ca) = super::tls_ca().filter(|_| self.url.starts_with("tls://")) {
            opts = opts.add_root_certificates(ca).require_tls(true);
        }
        let client = opts
            .name(s.name.clone())
            .subscription_capacity(s.sub_capacity)
            .max_reconnects(Some(0))
            .event_callback(move |e| {
                if let Event::SlowConsumer(_) = e {
                    // One event per dropped message (best effort: the
                    // event channel itself may overflow).
                    d.fetch_add(1, Ordering::Relaxed);
                }
                async {}
            })
            .connect(super::pick_server(&self.url, s.server))
            .await
            .with_context(|| format!("cannot connect to {}", self.url))?;
        Ok(NatsConn { client, drops })
    }
}

#[derive(Clone)]
pub struct NatsConn {
    client: Client,
    drops: Arc<AtomicU64>,
}

impl Incoming for Message {
    fn payload(&self) -> &[u8] {
        &self.payload
    }
}

pub struct NatsSub {
    sub: Subscriber,
    drops: Arc<AtomicU64>,
}

impl Sub for NatsSub {
    type Msg = Message;
    async fn next(&mut self) -> Option<Message> {
        self.sub.next().await
    }
    fn dropped(&self) -> u64 {
        // Every scenario gives each subscription its own connection.
        self.drops.load(Ordering::Relaxed)
    }
}

impl Conn for NatsConn {
    type Topic = Subject;
    type Msg = Message;
    type Sub = NatsSub;

    fn topic(&self, subject: &str) -> Subject {
        Subject::from(subject)
    }

    async fn publish(&self, topic: &Subject, payload: Bytes) -> anyhow::Result<()> {
        Ok(self.client.publish(topic.clone(), payload).await?)
    }

    async fn subscribe(&self, subject: &str, queue: Option<&str>) -> anyhow::Result<NatsSub> {
        let sub = match queue {
            Some(q) => {
                self.client
                    .queue_subscribe(subject.to_string(), q.to_string())
                    .await?
            }
            None => self.client.subscribe(subject.to_string()).await?,
        };
        Ok(NatsSub {
            sub,
            drops: self.drops.clone(),
        })
    }

    async fn request(
        &self,
        topic: &Subject,
        payload: Bytes,
        timeout: Duration,
    ) -> anyhow::Result<Bytes> {
        match tokio::time::timeout(timeout, self.client.request(topic.clone(), payload)).await {
            Ok(r) => Ok(r?.payload),
            Err(_) => bail!("request timed out after {timeout:?}"),
        }
    }

    async fn respond(&self, request: &Message, payload: Bytes) -> anyhow::Result<()> {
        match &request.reply {
            Some(reply) => Ok(self.client.publish(reply.clone(), payload).await?),
            None => Ok(()),
        }
    }

    /// async-nats' `flush` only writes the socket; a request nobody answers
    /// is a true round trip (the server replies "no responders").
    async fn sync(&self) -> anyhow::Result<()> {
        let probe = format!("_LT.SYNC.{}", self.client.new_inbox());
        let req = self.client.request(probe, Bytes::new());
        match tokio::time::timeout(Duration::from_secs(10), req).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Ok(Err(e)) => Err(e).context("round trip to nats-server failed"),
            Err(_) => bail!("no round trip to nats-server within 10 s"),
        }
    }
}

impl Durable for NatsConn {
    type Ack = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

    async fn create_stream(&self, name: &str, subject: &str, replicas: u32) -> anyhow::Result<()> {
        let js = async_nats::jetstream::new(self.client.clone());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![subject.to_string()],
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: replicas as usize,
            ..Default::default()
        })
        .await
        .context("cannot create a JetStream stream (is nats-server running with -js?)")?;
        Ok(())
    }

    async fn publish_acked(&self, topic: &Subject, payload: Bytes) -> anyhow::Result<Self::Ack> {
        let js = async_nats::jetstream::new(self.client.clone());
        let ack = js.publish(topic.clone(), payload).await?;
        Ok(Box::pin(async move {
            ack.await?;
            Ok(())
        }))
    }

    async fn read_stream(&self, name: &str, count: u64, idle: Duration) -> anyhow::Result<u64> {
        use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
        let js = async_nats::jetstream::new(self.client.clone());
        let stream = js.get_stream(name).await?;
        let consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .create_consumer(pull::Config {
                ack_policy: AckPolicy::None,
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(1000)
            .messages()
            .await?;
        let mut n = 0;
        while n < count {
            match tokio::time::timeout(idle, messages.next()).await {
                Ok(Some(m)) => {
                    m.map_err(|e| anyhow::anyhow!("reading the stream back: {e}"))?;
                    n += 1;
                }
                Ok(None) | Err(_) => break,
            }
        }
        Ok(n)
    }

    async fn delete_stream(&self, name: &str) -> anyhow::Result<()> {
        async_nats::jetstream::new(self.client.clone())
            .delete_stream(name)
            .await?;
        Ok(())
    }
}
