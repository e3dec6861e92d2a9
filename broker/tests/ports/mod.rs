//! Loopback ports for brokers a test starts as processes.
//!
//! `bind(127.0.0.1:0)` hands out a port from the kernel's ephemeral range
//! and forgets it: two calls may return the same port, and while a test has
//! a broker stopped (kill -9, then restart on the same port) any outgoing
//! connection on the machine may take that port as its local one, so the
//! restarted broker cannot listen there, or a client that dials it reaches
//! another broker. These ports come from below the ephemeral range (the
//! kernel never picks them for outgoing connections), are never handed out
//! twice by one test process, and start at an offset from the process id so
//! test binaries running side by side rarely try the same ones.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

const LOW: u32 = 12_000;
const SPAN: u32 = 20_000; // up to 32000, below the default ephemeral range (32768-60999)

static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

/// A loopback port nobody listens on now, unique within this test process.
pub fn free_port() -> u16 {
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() % 200) * 100,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + n % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN)
}
