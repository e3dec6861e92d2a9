//! sockbus broker: subject-based pub/sub with wildcards, queue groups and
//! request/reply over the native protocol (sockbus-protocol).
//!
//! One module per concern: `server` accepts, `conn` speaks the protocol to
//! one client, `router` finds subscribers, `outbox` batches and bounds what
//! goes back out, `config` validates settings, `metrics` counts.

pub mod accel;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod http;
pub mod metrics;
pub mod router;
pub mod server;
pub mod store;
pub mod streams;

pub use config::{Config, Options};
pub use server::{Server, State};
