//! Model-checks the Outbox, the structure every publishing task writes into
//! and a connection's writer drains, under all interleavings loom explores.
//! Run: RUSTFLAGS="--cfg sockbus_loom" cargo test -p sockbus-protocol --test loom_outbox --release
#![cfg(sockbus_loom)]

use loom::sync::Arc;
use loom::thread;
use sockbus_protocol::frame::{encode_ping, parse_header, HEADER_LEN};
use sockbus_protocol::outbox::{Outbox, Push};
use sockbus_protocol::FrameRef;

const FRAME: usize = HEADER_LEN + 8;

/// Decodes the ping ids in a run of whole frames.
fn ids(mut b: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    while let Ok(Some(h)) = parse_header(b) {
        let f = sockbus_protocol::decode_body(&h, &b[HEADER_LEN..h.frame_len()]).unwrap();
        let FrameRef::Ping(id) = f else {
            panic!("not a ping")
        };
        out.push(id);
        b = &b[h.frame_len()..];
    }
    assert!(b.is_empty(), "writer took a partial frame");
    out
}

#[test]
fn every_accepted_frame_is_taken_once_in_producer_order_within_budget() {
    loom::model(|| {
        // Room for three frames: with two producers of two frames each, some
        // interleavings overflow and must refuse rather than exceed.
        let ob = Arc::new(Outbox::new(3 * FRAME, 0));
        let mut producers = Vec::new();
        for p in 0..2u64 {
            let ob = ob.clone();
            producers.push(thread::spawn(move || {
                let mut accepted = Vec::new();
                for i in 0..2u64 {
                    let id = p * 100 + i;
                    match ob.push(FRAME, |b| encode_ping(b, id)) {
                        Push::Queued { .. } => accepted.push(id),
                        Push::OverBudget => {}
                        Push::Closed => panic!("not closed"),
                    }
                }
                accepted
            }));
        }
        let writer = {
            let ob = ob.clone();
            thread::spawn(move || {
                let mut taken = Vec::new();
                for _ in 0..2 {
                    let t = ob.take();
                    assert!(t.data.len() <= 3 * FRAME, "buffer exceeded its budget");
                    taken.extend(ids(&t.data));
                    thread::yield_now();
                }
                taken
            })
        };
        let mut accepted: Vec<Vec<u64>> =
            producers.into_iter().map(|h| h.join().unwrap()).collect();
        let mut taken = writer.join().unwrap();
        taken.extend(ids(&ob.take().data));
        // Nothing lost, nothing duplicated, each producer's order kept.
        for (p, acc) in accepted.iter_mut().enumerate() {
            let mine: Vec<u64> = taken
                .iter()
                .copied()
                .filter(|id| id / 100 == p as u64)
                .collect();
            assert_eq!(&mine, acc);
        }
        assert_eq!(taken.len(), accepted.iter().map(Vec::len).sum::<usize>());
    });
}

#[test]
fn credit_limits_what_is_taken_and_grants_are_never_lost() {
    loom::model(|| {
        // The peer's window fits one frame at a time.
        let ob = Arc::new(Outbox::new(1 << 20, FRAME as u32));
        for id in 0..2 {
            assert!(matches!(
                ob.push(FRAME, |b| encode_ping(b, id)),
                Push::Queued { .. }
            ));
        }
        let granter = {
            let ob = ob.clone();
            thread::spawn(move || {
                // Our reader owes the peer credit while the peer credits us.
                ob.grant(7);
                ob.on_credit(FRAME as u32);
            })
        };
        let first = ob.take();
        assert!(
            first.data.len() <= FRAME,
            "took more than the credit allows"
        );
        let mut got = ids(&first.data);
        let mut grants = first.grant;
        granter.join().unwrap();
        let rest = ob.take();
        got.extend(ids(&rest.data));
        grants += rest.grant;
        assert_eq!(
            grants, 7,
            "credit owed to the peer is always handed to the writer"
        );
        // One frame per credit: after one credit at most two frames went out.
        assert!(!got.is_empty() && got.len() <= 2);
        assert_eq!(got, (0..got.len() as u64).collect::<Vec<_>>());
    });
}

/// A socket with room for everything: appends all slices.
fn take_all(
    socket: &loom::sync::Mutex<Vec<u8>>,
    s: &[std::io::IoSlice<'_>],
) -> std::io::Result<usize> {
    let mut sock = socket.lock().unwrap();
    for b in s {
        sock.extend_from_slice(b);
    }
    Ok(s.iter().map(|b| b.len()).sum())
}

/// A producer writing directly (claim_direct) and the connection's writer
/// task (claim) share the writer role: whatever the interleaving, every frame
/// reaches the "socket" once, in queue order, and a partial write's rest goes
/// out before anything queued after it.
#[test]
fn direct_and_task_writers_never_interleave_or_lose_bytes() {
    use sockbus_protocol::outbox::Direct;
    use std::io;
    loom::model(|| {
        let ob = Arc::new(Outbox::new(1 << 20, 0));
        let socket = Arc::new(loom::sync::Mutex::new(Vec::<u8>::new()));
        for id in 0..2 {
            ob.push(FRAME, |b| encode_ping(b, id));
        }
        let direct = {
            let (ob, socket) = (ob.clone(), socket.clone());
            thread::spawn(move || {
                ob.push(FRAME, |b| encode_ping(b, 2));
                if let Direct::Write(mut t) = ob.claim_direct(usize::MAX) {
                    // The socket takes 5 bytes, then would block.
                    let mut room = 5usize;
                    let done = t
                        .write_nonblocking(usize::MAX, |s| {
                            if room == 0 {
                                return Err(io::ErrorKind::WouldBlock.into());
                            }
                            let mut sock = socket.lock().unwrap();
                            let mut n = 0;
                            for b in s {
                                let k = b.len().min(room - n);
                                sock.extend_from_slice(&b[..k]);
                                n += k;
                            }
                            room -= n;
                            Ok(n)
                        })
                        .unwrap();
                    assert!(!done);
                    ob.release(t);
                }
            })
        };
        let task = {
            let (ob, socket) = (ob.clone(), socket.clone());
            thread::spawn(move || {
                for _ in 0..2 {
                    if let Some(mut t) = ob.claim() {
                        let done = t
                            .write_nonblocking(usize::MAX, |s| take_all(&socket, s))
                            .unwrap();
                        assert!(done);
                        ob.release(t);
                    }
                    thread::yield_now();
                }
            })
        };
        direct.join().unwrap();
        task.join().unwrap();
        // Whatever is left (the rest of a partial write, new frames) goes last.
        while let Some(mut t) = ob.claim() {
            t.write_nonblocking(usize::MAX, |s| take_all(&socket, s))
                .unwrap();
            ob.release(t);
        }
        assert_eq!(ids(&socket.lock().unwrap()), vec![0, 1, 2]);
    });
}
