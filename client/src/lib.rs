//! Async Rust client for the sockbus broker.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sockbus_client::Error> {
//! use futures_util::StreamExt;
//! let client = sockbus_client::connect("sockbus://127.0.0.1:7420").await?;
//! let mut sub = client.subscribe("orders.>").await?;
//! client.publish("orders.eu.created", "hello").await?;
//! client.flush().await?;
//! let msg = sub.next().await.expect("a message");
//! assert_eq!(msg.payload.as_ref(), b"hello");
//! # Ok(()) }
//! ```
//!
//! Publishing only queues the frame in the connection's outbound buffer (one
//! lock, one copy); a background writer sends everything queued in one write.
//! `flush()` resolves once the broker has processed everything sent before it.

mod client;
mod connector;
mod error;
mod message;
mod options;
mod reader;
mod request;
pub mod streams;
mod subscriber;
#[cfg(test)]
mod testing;
mod tls;
mod writer;

pub use client::Client;
pub use error::{Error, Result};
pub use message::{Headers, Message};
pub use options::{connect, ConnectOptions, Overflow};
pub use subscriber::Subscriber;
pub use tls::TlsOptions;

pub use sockbus_protocol::busy_poll::BusyPoll;

/// Starts busy-polling on the current tokio runtime: for `window` after each
/// read or write of any connection in this process, the runtime keeps
/// looking for I/O instead of sleeping, so a reply is read as soon as it
/// arrives rather than after a thread wake-up (on a VM, a halted vCPU's
/// wake-up can cost more than the round trip). While traffic flows this
/// costs one core; after `window` without traffic the poller sleeps until
/// the next read or write. Polling stops when the returned value is dropped.
///
/// It works on a runtime whose single thread owns the I/O driver: a
/// current-thread runtime or a multi-thread runtime with one worker (with
/// more workers a warning is logged: the poller would mostly burn CPU).
/// The broker's counterpart is `sockbus-broker --busy-poll`.
///
/// ```no_run
/// # async fn demo() {
/// let _poll = sockbus_client::busy_poll(std::time::Duration::from_micros(200));
/// # }
/// ```
///
/// Panics outside a tokio runtime.
pub fn busy_poll(window: std::time::Duration) -> BusyPoll {
    let h = tokio::runtime::Handle::current();
    let workers = h.metrics().num_workers();
    if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread && workers > 1 {
        tracing::warn!(
            workers,
            "busy_poll on a runtime with {workers} workers: use a current-thread runtime or one worker, or the poller mostly burns CPU"
        );
    }
    sockbus_protocol::busy_poll::spawn(window)
}

/// Default server when neither `--server` nor `SOCKBUS_URL` is given.
pub const DEFAULT_URL: &str = "sockbus://127.0.0.1:7420";
