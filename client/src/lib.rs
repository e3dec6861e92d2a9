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
mod error;
mod message;
pub mod streams;

pub use client::{connect, Client, ConnectOptions, Subscriber};
pub use error::{Error, Result};
pub use message::{Headers, Message};

/// Default server when neither `--server` nor `SOCKBUS_URL` is given.
pub const DEFAULT_URL: &str = "sockbus://127.0.0.1:7420";
