//! Clients during a run: publishers (durable publish, acks, the same
//! `Msg-Id` on every retry, any node) and durable consumers (explicit ack,
//! `ack_sync`), each recording what it saw for the checker.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sockbus_client::streams::{ConsumerConfig, MSG_ID_HEADER};
use sockbus_client::{ConnectOptions, Headers};

pub const STREAM: &str = "FAULTS";
pub const SUBJECT: &str = "faults.data";
/// Consumers' ack wait: longer than any pause or link outage the harness
/// injects (at most 6 s, plus TCP's retransmission after it), so an ack
/// sent in time reaches the broker within it. A shorter one makes the
/// broker redeliver a message whose ack is still in flight, which ack_wait
/// allows (seed 400 with 4 s: a 4.5 s SIGSTOP of the stream's node).
pub const ACK_WAIT: Duration = Duration::from_secs(15);

/// Flags the run flips as it ends.
#[derive(Default)]
pub struct Phase {
    /// Publishers start no new message (they still retry the one in flight).
    pub stop_publishing: AtomicBool,
    /// Publishers give up on the message in flight.
    pub give_up: AtomicBool,
    /// Consumers stop once they have seen this sequence (0: keep going).
    pub drain_to: AtomicU64,
    pub stop_consuming: AtomicBool,
}

#[derive(Debug, Clone)]
pub struct Acked {
    pub id: String,
    pub seq: u64,
    pub duplicate: bool,
}

#[derive(Debug, Default)]
pub struct PubLog {
    pub acked: Vec<Acked>,
    /// Published but never acked (in flight when the run ended).
    pub unacked: Vec<String>,
    pub attempts: u64,
    pub errors: u64,
}

#[derive(Debug, Default)]
pub struct ConsLog {
    pub name: String,
    /// (seq, payload, delivery count) in the order received.
    pub seen: Vec<(u64, String, u32)>,
    /// Seqs whose `ack_sync` returned Ok.
    pub acked: HashSet<u64>,
    pub violations: Vec<String>,
    pub errors: u64,
    /// The last few errors, as evidence when a consumer gets stuck.
    pub last_errors: Vec<String>,
}

impl ConsLog {
    fn error(&mut self, what: &str, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.last_errors.len() == 5 {
            self.last_errors.remove(0);
        }
        self.last_errors.push(format!("{what}: {e}"));
    }
}

fn urls(all: &[String], first: usize) -> String {
    (0..all.len())
        .map(|i| all[(first + i) % all.len()].clone())
        .collect::<Vec<_>>()
        .join(",")
}

async fn connect(all: &[String], first: usize, name: &str) -> sockbus_client::Client {
    loop {
        let r = ConnectOptions::new()
            .name(name)
            .connect_timeout(Duration::from_secs(2))
            .request_timeout(Duration::from_secs(2))
            .max_reconnect_delay(Duration::from_millis(500))
            .connect(&urls(all, first))
            .await;
        match r {
            Ok(c) => return c,
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

pub async fn publisher(k: usize, all: Vec<String>, phase: Arc<Phase>, log: Arc<Mutex<PubLog>>) {
    let c = connect(&all, k, &format!("faults-pub-{k}")).await;
    let mut i = 0u64;
    while !phase.stop_publishing.load(Ordering::Relaxed) {
        i += 1;
        let id = format!("p{k}-{i:07}");
        let mut h = Headers::new();
        h.insert(MSG_ID_HEADER, id.clone());
        loop {
            if phase.give_up.load(Ordering::Relaxed) {
                log.lock().unwrap().unacked.push(id.clone());
                return;
            }
            log.lock().unwrap().attempts += 1;
            let r = tokio::time::timeout(
                Duration::from_secs(4),
                c.publish_durable_with_headers(SUBJECT, &h, id.as_bytes()),
            )
            .await;
            match r {
                Ok(Ok(ack)) => {
                    log.lock().unwrap().acked.push(Acked {
                        id: id.clone(),
                        seq: ack.seq,
                        duplicate: ack.duplicate,
                    });
                    break;
                }
                _ => {
                    log.lock().unwrap().errors += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

pub async fn consumer(
    k: usize,
    first: usize,
    all: Vec<String>,
    phase: Arc<Phase>,
    log: Arc<Mutex<ConsLog>>,
) {
    let name = format!("c{k}");
    log.lock().unwrap().name = name.clone();
    let mut c = connect(&all, first, &format!("faults-{name}")).await;
    let mut last_seen = 0u64;
    let mut failed_creates = 0;
    loop {
        if phase.stop_consuming.load(Ordering::Relaxed) {
            return;
        }
        let cfg = ConsumerConfig::durable(name.clone())
            .ack_wait(ACK_WAIT)
            .batch(32);
        let mut cons = match c.consumer(STREAM, cfg).await {
            Ok(x) => {
                failed_creates = 0;
                x
            }
            Err(e) => {
                log.lock().unwrap().error("consumer create", e);
                tokio::time::sleep(Duration::from_millis(300)).await;
                failed_creates += 1;
                if failed_creates >= 3 {
                    // Failed over to a node that does not serve the stream
                    // (R1 on main serves it only on its own node): start
                    // again from the preferred node.
                    let _ = c.close().await;
                    c = connect(&all, first, &format!("faults-{name}")).await;
                    failed_creates = 0;
                }
                continue;
            }
        };
        loop {
            if phase.stop_consuming.load(Ordering::Relaxed) {
                return;
            }
            let drain_to = phase.drain_to.load(Ordering::Relaxed);
            if drain_to > 0 && last_seen >= drain_to {
                return;
            }
            match cons.next_timeout(Duration::from_secs(2)).await {
                Ok(Some(m)) => {
                    let id = String::from_utf8_lossy(m.payload()).into_owned();
                    {
                        let mut l = log.lock().unwrap();
                        if l.acked.contains(&m.seq) {
                            let v = format!(
                                "consumer {name} got seq {} ({id}, delivery {}) again after its ack_sync had returned",
                                m.seq, m.deliveries
                            );
                            l.violations.push(v);
                        }
                        l.seen.push((m.seq, id, m.deliveries));
                    }
                    last_seen = last_seen.max(m.seq);
                    let r = tokio::time::timeout(Duration::from_secs(4), m.ack_sync()).await;
                    let mut l = log.lock().unwrap();
                    match r {
                        Ok(Ok(())) => {
                            l.acked.insert(m.seq);
                        }
                        Ok(Err(e)) => l.error("ack_sync", e),
                        Err(_) => l.error("ack_sync", "no answer within 4 s"),
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    log.lock().unwrap().error("next", e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

/// Every message of the stream as node `node` serves it (an ephemeral
/// consumer without acks on a client connected to that node only).
pub async fn read_all(url: &str, last_seq: u64) -> anyhow::Result<Vec<(u64, String)>> {
    let c = ConnectOptions::new()
        .connect_timeout(Duration::from_secs(3))
        .request_timeout(Duration::from_secs(5))
        .max_reconnects(0)
        .connect(url)
        .await?;
    let mut cons = c
        .consumer(STREAM, ConsumerConfig::ephemeral().no_ack(true).batch(256))
        .await?;
    let mut out = Vec::new();
    while out.last().is_none_or(|(s, _)| *s < last_seq) {
        match cons.next_timeout(Duration::from_secs(5)).await? {
            Some(m) => out.push((m.seq, String::from_utf8_lossy(m.payload()).into_owned())),
            None => break,
        }
    }
    let _ = c.close().await;
    Ok(out)
}
