//! Broker-wide counters. Hot paths count locally and add here once per read
//! batch, so two cores never fight over these cache lines per message.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default, Debug)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_refused: AtomicU64,
    pub msgs_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub msgs_out: AtomicU64,
    pub bytes_out: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub malformed_frames: AtomicU64,
    pub payload_too_large: AtomicU64,
    pub invalid_subjects: AtomicU64,
    pub no_responders: AtomicU64,
    /// Cluster routes this broker dialed that are up.
    pub routes: AtomicU64,
    /// Messages received from peers over cluster routes.
    pub route_msgs_in: AtomicU64,
}

/// Per-batch counts, flushed into [`Metrics`] by their owner.
#[derive(Default, Debug, Clone, Copy)]
pub struct LocalCounts {
    pub msgs_in: u64,
    pub bytes_in: u64,
    pub msgs_out: u64,
    pub bytes_out: u64,
}

impl Metrics {
    pub fn add(&self, c: &mut LocalCounts) {
        if c.msgs_in != 0 {
            self.msgs_in.fetch_add(c.msgs_in, Relaxed);
            self.bytes_in.fetch_add(c.bytes_in, Relaxed);
        }
        if c.msgs_out != 0 {
            self.msgs_out.fetch_add(c.msgs_out, Relaxed);
            self.bytes_out.fetch_add(c.bytes_out, Relaxed);
        }
        *c = LocalCounts::default();
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}
