//! Credit-based flow control, as pure accounting.
//!
//! Each side announces a receive window (bytes) in CONNECT / INFO. The other
//! side keeps at most that many bytes of frames in flight; the receiver grants
//! more with CREDIT frames as it consumes. CREDIT frames themselves are never
//! counted, so a side that is out of credit can still grant credit and two
//! peers can never wait on each other. A declared window of 0 means the
//! default window; flow control is always on between peers. (`SendWindow`
//! with 0 is unlimited, for a buffer not yet attached to a peer.)
//!
//! This matters most on the eBPF fast path, where the kernel ignores the
//! receiver's socket buffer and would queue without bound.

use crate::frame::{parse_header, HEADER_LEN, MAX_FRAME_OVERHEAD};

/// Window used when a peer declares 0: flow control cannot be turned off,
/// because on the eBPF fast path nothing else bounds the kernel's queue.
pub const DEFAULT_WINDOW: u32 = 8 << 20;

/// The window both sides use for a declared one: 0 means [`DEFAULT_WINDOW`],
/// and it is never smaller than two maximal frames, so a receiver holding
/// back less than a quarter of it in ungranted credit never stalls a sender.
pub fn effective_window(declared: u32, max_payload: u32) -> u32 {
    let declared = if declared == 0 {
        DEFAULT_WINDOW
    } else {
        declared
    };
    let max_frame = max_payload
        .saturating_add(MAX_FRAME_OVERHEAD)
        .saturating_add(HEADER_LEN as u32);
    declared.max(max_frame.saturating_mul(2))
}

/// Sender side: how many bytes may still go out.
#[derive(Debug, Clone)]
pub struct SendWindow {
    window: u32,
    in_flight: u64,
}

impl SendWindow {
    pub fn new(window: u32) -> Self {
        SendWindow {
            window,
            in_flight: 0,
        }
    }

    /// Bytes that may be sent now; `usize::MAX` when flow control is off.
    pub fn available(&self) -> usize {
        if self.window == 0 {
            return usize::MAX;
        }
        (self.window as u64).saturating_sub(self.in_flight) as usize
    }

    pub fn on_sent(&mut self, n: usize) {
        if self.window != 0 {
            self.in_flight += n as u64;
        }
    }

    /// Applies a CREDIT frame. Credit beyond what is in flight is a peer bug;
    /// it is clamped so it cannot widen the window.
    pub fn on_credit(&mut self, n: u32) {
        self.in_flight = self.in_flight.saturating_sub(n as u64);
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }
}

/// Receiver side: when to grant credit back.
#[derive(Debug, Clone)]
pub struct RecvWindow {
    window: u32,
    pending: u32,
}

impl RecvWindow {
    pub fn new(window: u32) -> Self {
        RecvWindow { window, pending: 0 }
    }

    /// Records `n` consumed bytes (whole non-CREDIT frames). Returns the
    /// credit to grant now, once a quarter of the window has been consumed.
    pub fn on_consumed(&mut self, n: usize) -> Option<u32> {
        if self.window == 0 {
            return None;
        }
        self.pending = self.pending.saturating_add(n as u32);
        if self.pending >= self.window / 4 {
            let c = self.pending;
            self.pending = 0;
            Some(c)
        } else {
            None
        }
    }
}

/// Length of the longest prefix of `buf` (a run of whole, encoded frames)
/// that holds only whole frames and is at most `limit` bytes. Used to cut a
/// write at a frame boundary when credit runs short, so that a CREDIT frame
/// can be sent between any two writes.
pub fn aligned_prefix(buf: &[u8], limit: usize) -> usize {
    if buf.len() <= limit {
        return buf.len();
    }
    let mut at = 0;
    while let Ok(Some(h)) = parse_header(&buf[at..]) {
        let next = at + h.frame_len();
        if next > limit || next > buf.len() {
            break;
        }
        at = next;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_ping, encode_pub};

    #[test]
    fn window_zero_means_unlimited() {
        let mut w = SendWindow::new(0);
        w.on_sent(1 << 30);
        assert_eq!(w.available(), usize::MAX);
        let mut r = RecvWindow::new(0);
        assert_eq!(r.on_consumed(1 << 30), None);
    }

    #[test]
    fn credit_reopens_the_window() {
        let mut w = SendWindow::new(1000);
        w.on_sent(800);
        assert_eq!(w.available(), 200);
        w.on_credit(500);
        assert_eq!(w.available(), 700);
        w.on_credit(10_000);
        assert_eq!(w.available(), 1000, "excess credit never widens the window");
    }

    #[test]
    fn receiver_grants_in_quarters() {
        let mut r = RecvWindow::new(1000);
        assert_eq!(r.on_consumed(100), None);
        assert_eq!(r.on_consumed(100), None);
        assert_eq!(r.on_consumed(100), Some(300));
        assert_eq!(r.on_consumed(10), None);
    }

    #[test]
    fn effective_window_fits_two_max_frames() {
        assert_eq!(
            effective_window(0, 1 << 20),
            DEFAULT_WINDOW,
            "0 cannot turn flow control off"
        );
        let w = effective_window(1024, 1 << 20);
        assert!(w as u64 >= 2 * ((1 << 20) + MAX_FRAME_OVERHEAD as u64));
        assert_eq!(effective_window(64 << 20, 1 << 20), 64 << 20);
    }

    #[test]
    fn aligned_prefix_stops_at_frame_boundaries() {
        let mut buf = Vec::new();
        encode_ping(&mut buf, 1); // 20 bytes
        encode_pub(&mut buf, "a.b", None, &[], &[0u8; 100]).unwrap();
        encode_ping(&mut buf, 2);
        let first = 20;
        let second = buf.len() - 20;
        assert_eq!(aligned_prefix(&buf, buf.len()), buf.len());
        assert_eq!(aligned_prefix(&buf, 19), 0);
        assert_eq!(aligned_prefix(&buf, 20), first);
        assert_eq!(aligned_prefix(&buf, second - 1), first);
        assert_eq!(aligned_prefix(&buf, second), second);
        assert_eq!(aligned_prefix(&buf, buf.len() - 1), second);
    }
}
