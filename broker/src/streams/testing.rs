//! Support for the streams' unit tests: a delivery engine without a server,
//! and inboxes (outlets with no socket) whose messages a test reads back.

use std::sync::Arc;
use std::time::Duration;

use sockbus_protocol::frame::{self, iter_headers};
use sockbus_protocol::outbox::Outbox;
use sockbus_protocol::FrameRef;
use tokio_util::sync::CancellationToken;

use crate::deliver::Delivery;
use crate::outlet::Outlet;
use crate::router::Router;

pub(crate) fn delivery() -> Delivery {
    Delivery::new(Router::default(), Default::default(), 1 << 20, 64 << 20, 0)
}

/// One MSG queued for an inbox.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub subject: String,
    pub reply: Option<String>,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A subscriber on `subject` with no socket: what is delivered to it
/// stays in its outbox until the test takes it.
pub(crate) struct Inbox {
    pub subject: String,
    out: Arc<Outlet>,
}

impl Inbox {
    pub fn new(d: &Delivery, subject: &str) -> Inbox {
        let out = Arc::new(Outlet::new(
            d.next_id(),
            Outbox::new(64 << 20, 0),
            CancellationToken::new(),
            None,
        ));
        d.subscribe(
            &crate::deliver::Subscriber {
                api: true,
                perms: None,
            },
            &out,
            1,
            subject,
            None,
        )
        .expect("a valid inbox");
        Inbox {
            subject: subject.to_string(),
            out,
        }
    }

    /// Every MSG queued so far.
    pub fn take(&self) -> Vec<Received> {
        let t = self.out.outbox.take();
        let mut data = &t.data[..];
        let mut got = Vec::new();
        while let Ok(Some((f, len))) = frame::decode(data, u32::MAX) {
            data = &data[len..];
            let FrameRef::Msg {
                subject,
                reply,
                headers,
                payload,
                ..
            } = f
            else {
                panic!("unexpected frame {f:?}");
            };
            got.push(Received {
                subject: subject.into(),
                reply: reply.map(String::from),
                headers: iter_headers(headers)
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
                payload: payload.into(),
            });
        }
        assert!(data.is_empty(), "a partial frame in the outbox");
        got
    }

    /// Waits (at most 10 s) until something arrives and takes it.
    pub async fn next(&self) -> Vec<Received> {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.take();
            if !got.is_empty() {
                return got;
            }
            tokio::time::timeout_at(give_up, self.out.notify.notified())
                .await
                .unwrap_or_else(|_| panic!("nothing arrived on {} in 10 s", self.subject));
        }
    }
}
