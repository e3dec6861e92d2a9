//! Push consumers: a consumer with a JetStream `deliver_subject` delivers
//! without being asked, to whoever subscribes to that subject (one member
//! of each queue group on it, as any publish: `deliver_group`). Driven as
//! a loop of pulls on the consumer's own machinery, so acks, redelivery,
//! `max_ack_pending` and durable state are the same as for pull consumers:
//! while the subject has subscribers a pull of up to `ROUND` messages runs
//! (waiting up to a second for messages), then the next; while it has none
//! the loop checks again every `IDLE`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::streams::consumer::{Consumer, Flavor, Pull};

const ROUND: usize = 256;
const IDLE: Duration = Duration::from_millis(100);

pub(super) fn spawn(c: Arc<Consumer>, subject: String, heartbeat: Option<Duration>) {
    tokio::spawn(async move {
        while !c.is_stopped() {
            let (inbox, _) = c.delivery().router().compute(&subject);
            if inbox.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(IDLE) => {}
                    _ = c.stopped() => return,
                }
                continue;
            }
            c.touch();
            let (tx, rx) = oneshot::channel();
            c.pull_with(Pull {
                reply: subject.clone(),
                batch: ROUND,
                max_bytes: usize::MAX,
                // Long enough for an idle heartbeat to fall inside it.
                expires: heartbeat
                    .map_or(Duration::from_secs(1), |h| h * 2 + Duration::from_secs(1)),
                no_wait: false,
                flavor: Flavor::Js,
                heartbeat,
                push: true,
                done: Some(tx),
                origin: None,
            });
            tokio::select! {
                _ = rx => {}
                _ = c.stopped() => return,
            }
        }
    });
}
