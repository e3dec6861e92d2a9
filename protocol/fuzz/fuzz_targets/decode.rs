//! Feeds arbitrary bytes to the decoder the way a connection would: decode a
//! frame, consume it, repeat until an error or a partial frame. Beyond "no
//! panic" it checks that what decodes re-encodes to a frame that decodes the
//! same, that a header block accepted by the decoder iterates to its end, and
//! that `aligned_prefix` never cuts past its limit.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sockbus_protocol::flow::aligned_prefix;
use sockbus_protocol::frame::iter_headers;
use sockbus_protocol::{decode, Frame, FrameRef, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    // The first two bytes pick a write limit, as if credit ran short.
    let limit = match data {
        [a, b, ..] => u16::from_le_bytes([*a, *b]) as usize,
        _ => 0,
    };
    let cut = aligned_prefix(data, limit);
    assert!(cut <= data.len());
    assert!(cut == data.len() || cut <= limit);

    // A small body limit too, so the FrameTooLarge path is reached.
    for max_body in [u32::MAX, limit as u32] {
        let mut buf = data;
        loop {
            match decode(buf, max_body) {
                Ok(Some((f, used))) => {
                    assert!(used >= HEADER_LEN && used <= buf.len());
                    check_frame(f);
                    buf = &buf[used..];
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
});

fn check_frame(f: FrameRef<'_>) {
    if let FrameRef::Pub { headers, .. } | FrameRef::Msg { headers, .. } = f {
        // The decoder validated the block, so iteration must reach its end.
        let walked: usize = iter_headers(headers)
            .map(|(k, v)| 4 + k.len() + v.len())
            .sum();
        assert_eq!(walked, headers.len(), "iter_headers stopped early");
    }
    if let FrameRef::Err { text, .. } = f {
        if text.len() > 1024 {
            return; // encode_err cuts long texts on purpose
        }
    }
    let owned = Frame::from(f);
    let mut again = Vec::new();
    owned
        .encode(&mut again)
        .expect("a decoded frame re-encodes");
    let (back, used) = decode(&again, u32::MAX)
        .expect("a re-encoded frame decodes")
        .expect("a re-encoded frame is whole");
    assert_eq!(used, again.len());
    assert_eq!(Frame::from(back), owned);
}
