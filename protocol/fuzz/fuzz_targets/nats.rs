//! Feeds arbitrary bytes to the NATS front end's parser the way the broker
//! reads a connection: parse, consume (or skip an oversized PUB), repeat.
//! Beyond "no panic": a consumed length never passes the buffer, and a
//! header block that converts to a sockbus block converts back to text of
//! the length `headers_len` says.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sockbus_protocol::nats::{self, Op, Parsed};

fuzz_target!(|data: &[u8]| {
    let max = match data {
        [a, ..] => *a as usize * 16,
        _ => 0,
    };
    let mut buf = data;
    loop {
        match nats::parse(buf, max) {
            Ok(Parsed::Op(op, n)) => {
                assert!(n > 0 && n <= buf.len());
                if let Op::Pub { headers, .. } = op {
                    if let Ok(block) = nats::headers_to_block(headers) {
                        let m = nats::Msg {
                            subject: "s",
                            sid: 1,
                            reply: None,
                            headers: &block,
                            payload: b"",
                            no_responders: false,
                        };
                        let mut out = Vec::new();
                        nats::encode_msg(&mut out, &m);
                        assert_eq!(out.len(), m.len());
                    }
                }
                buf = &buf[n..];
            }
            Ok(Parsed::TooLarge { skip, .. }) => {
                if skip >= buf.len() {
                    break;
                }
                buf = &buf[skip..];
            }
            Ok(Parsed::Incomplete(_)) | Err(_) => break,
        }
    }
});
