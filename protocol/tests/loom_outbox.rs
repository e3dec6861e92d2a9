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
