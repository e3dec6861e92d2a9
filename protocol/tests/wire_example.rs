//! Pins the worked example in docs/protocol.md to the real encoder, so the
//! documentation cannot drift from the bytes on the wire.

use sockbus_protocol::frame::{encode_pub, push_header};
use sockbus_protocol::{decode, FrameRef};

#[test]
fn documented_pub_example_is_what_the_encoder_writes() {
    let mut headers = Vec::new();
    push_header(&mut headers, "k", "v").unwrap();
    let mut buf = Vec::new();
    encode_pub(&mut buf, "orders.eu", Some("_INBOX.1"), &headers, b"hi").unwrap();

    #[rustfmt::skip]
    let documented: &[u8] = &[
        0x53, 0x42, 0x03, 0x00, 0x21, 0x00, 0x00, 0x00, 0x24, 0x98, 0x76, 0xb3, 0x09, 0x00, 0x6f, 0x72,
        0x64, 0x65, 0x72, 0x73, 0x2e, 0x65, 0x75, 0x08, 0x00, 0x5f, 0x49, 0x4e, 0x42, 0x4f, 0x58, 0x2e,
        0x31, 0x06, 0x00, 0x00, 0x00, 0x01, 0x00, 0x6b, 0x01, 0x00, 0x76, 0x68, 0x69,
    ];
    assert_eq!(buf, documented);

    let (f, n) = decode(documented, u32::MAX).unwrap().unwrap();
    assert_eq!(n, 45);
    assert_eq!(
        f,
        FrameRef::Pub {
            flags: 0,
            subject: "orders.eu",
            reply: Some("_INBOX.1"),
            headers: &headers,
            payload: b"hi",
        }
    );
}

#[test]
fn an_err_names_a_refused_requests_reply_subject_by_its_hash_and_decodes_as_before() {
    use sockbus_protocol::frame::{encode_err_reply, err_reply, err_sid, parse_header};
    use sockbus_protocol::subject::subject_hash;
    let mut buf = Vec::new();
    encode_err_reply(
        &mut buf,
        15,
        "_INBOX.ab.7",
        "permission denied: publish to x",
    );
    let h = parse_header(&buf).unwrap().unwrap();
    assert_eq!(err_reply(&h), Some(subject_hash(b"_INBOX.ab.7")));
    assert_eq!(err_sid(&h), None);
    let (f, _) = decode(&buf, u32::MAX).unwrap().unwrap();
    assert_eq!(
        f,
        FrameRef::Err {
            code: 15,
            text: "permission denied: publish to x"
        }
    );
}
