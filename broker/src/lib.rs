//! sockbus broker: subject-based pub/sub with wildcards, queue groups,
//! request/reply, durable streams, cluster routes, an HTTP gateway and the
//! eBPF fast path.
//!
//! One module per concern: `server` accepts and builds the shared state,
//! `conn` speaks the native protocol to one client, `read` is the
//! frame-reading loop every connection kind shares, `deliver` is the one
//! delivery path (publish -> match -> fan-out -> capture -> flush),
//! `router` is the subscription index, `memory` gives what a mass
//! unsubscribe freed back to the system, `outlet` batches and bounds what goes
//! back out, `cluster` runs routes to peer brokers and tells them of local
//! interest, `streams` and `store` keep durable streams, `http` is the
//! gateway, `accel` the eBPF fast path, `config` validates settings,
//! `metrics` counts.
//!
//! The public API is what the `sockbus-broker` binary and a program that
//! embeds the broker need: [`Server`], [`Config`]/[`Options`], [`State`]'s
//! read-only accessors, [`http::HttpServer`], [`metrics`] and [`accel`].

pub mod accel;
mod account;
pub mod auth;
mod cluster;
pub mod config;
mod conn;
mod deliver;
pub mod http;
mod jetstream;
mod memory;
pub mod metrics;
mod nats;
mod outlet;
mod read;
mod replication;
mod router;
mod server;
mod store;
mod streams;
mod tls;
mod transport;

pub use config::{Config, Options};

/// Offline check of a stream directory's segments and CRCs
/// (`sockbus-broker verify-stream`), for operators and the fault harness.
pub mod offline {
    pub use crate::store::record::RecordRef;
    pub use crate::store::segment::BadRange;
    pub use crate::store::verify::{segment_files, verify_dir, SegmentCheck};
}
pub use server::{Server, State};
pub use streams::{StreamInfo, StreamState};
pub use tls::TlsFiles;
