//! Property tests for the decoder, the encoders and the subject matcher.
//!
//! The decoder reads untrusted bytes from the network, so beyond the round
//! trip we check that it never panics and never mistakes a partial frame for
//! an error: a reader that sees half a frame must simply wait for more bytes.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use sockbus_protocol::flow::aligned_prefix;
use sockbus_protocol::frame::{
    encode_msg, encode_pub_flags, iter_headers, pub_frame_len, push_header, MAGIC, PUB_ACK,
    PUB_ROOM, PUB_ROOM_LEN,
};
use sockbus_protocol::subject::subject_hash;
use sockbus_protocol::{
    decode, matches, validate_pattern, validate_subject, Frame, FrameRef, Kind, HEADER_LEN,
    PROTOCOL_VERSION,
};

// ------------------------------------------------------------ strategies

/// Any valid UTF-8, control characters and multi-byte chars included:
/// the codec itself puts no rule on string contents.
fn text(max_chars: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..=max_chars).prop_map(String::from_iter)
}

/// Optional strings encode `Some("")` exactly like `None`, so `Some` is
/// only ever non-empty here.
fn opt_text(max_chars: usize) -> impl Strategy<Value = Option<String>> {
    option::of(text(max_chars).prop_filter("Some(\"\") encodes as None", |s| !s.is_empty()))
}

fn header_block() -> impl Strategy<Value = (Vec<(String, String)>, Vec<u8>)> {
    vec((text(40), text(120)), 0..6).prop_map(|pairs| {
        let mut block = Vec::new();
        for (k, v) in &pairs {
            push_header(&mut block, k, v).expect("short header fits in a str16");
        }
        (pairs, block)
    })
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..4096)
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u8>(),
            any::<u32>(),
            text(200),
            vec(any::<u8>(), 0..300)
        )
            .prop_map(|(flags, recv_window, name, token)| Frame::Connect {
                flags,
                recv_window,
                name,
                token,
            }),
        (any::<u8>(), any::<u32>(), any::<u32>(), text(200)).prop_map(
            |(flags, recv_window, max_payload, server_name)| {
                Frame::Info {
                    flags,
                    recv_window,
                    max_payload,
                    server_name,
                }
            }
        ),
        (
            any::<u8>(),
            text(200),
            opt_text(200),
            header_block(),
            payload()
        )
            .prop_map(
                |(flags, subject, reply, (_, headers), payload)| Frame::Pub {
                    flags,
                    subject,
                    reply,
                    headers,
                    payload,
                }
            ),
        (any::<u32>(), text(200), opt_text(100)).prop_map(|(sid, subject, queue)| Frame::Sub {
            sid,
            subject,
            queue,
        }),
        (any::<u32>(), any::<u32>()).prop_map(|(sid, max)| Frame::Unsub { sid, max }),
        (
            any::<u32>(),
            any::<u8>(),
            text(200),
            opt_text(200),
            header_block(),
            payload()
        )
            .prop_map(
                |(sid, flags, subject, reply, (_, headers), payload)| Frame::Msg {
                    sid,
                    flags,
                    subject,
                    reply,
                    headers,
                    payload,
                }
            ),
        any::<u64>().prop_map(Frame::Ping),
        any::<u64>().prop_map(Frame::Pong),
        // 200 chars are at most 800 bytes, under encode_err's 1 KiB cut.
        (any::<u16>(), text(200)).prop_map(|(code, text)| Frame::Err { code, text }),
        any::<u32>().prop_map(Frame::Credit),
        (
            any::<u8>(),
            text(200),
            opt_text(200),
            proptest::collection::vec(text(40), 0..4),
            header_block(),
            payload()
        )
            .prop_map(|(flags, subject, reply, queues, (_, headers), payload)| {
                Frame::RMsg {
                    flags,
                    subject,
                    reply,
                    queues,
                    headers,
                    payload,
                }
            }),
    ]
}

fn encode(f: &Frame) -> Vec<u8> {
    let mut buf = Vec::new();
    f.encode(&mut buf)
        .expect("generated fields fit their length prefixes");
    buf
}

/// Frame boundaries of a buffer of whole frames: 0, end of frame 1, ...
fn boundaries(frames: &[Frame]) -> (Vec<u8>, Vec<usize>) {
    let mut buf = Vec::new();
    let mut ends = vec![0];
    for f in frames {
        f.encode(&mut buf).unwrap();
        ends.push(buf.len());
    }
    (buf, ends)
}

// ------------------------------------------------------------ codec

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_frame_survives_encode_then_decode(f in frame()) {
        let buf = encode(&f);
        let (r, used) = decode(&buf, u32::MAX).unwrap().expect("a whole frame is buffered");
        prop_assert_eq!(used, buf.len());
        match r {
            FrameRef::Connect { version, .. } | FrameRef::Info { version, .. } => {
                prop_assert_eq!(version, PROTOCOL_VERSION)
            }
            _ => {}
        }
        // PUB, MSG and RMSG carry the subject hash in the header for the kernel path.
        let hash = u32::from_le_bytes(buf[8..12].try_into().unwrap());
        match &f {
            Frame::Pub { subject, .. } | Frame::Msg { subject, .. } | Frame::RMsg { subject, .. } => {
                prop_assert_eq!(hash, subject_hash(subject.as_bytes()))
            }
            _ => prop_assert_eq!(hash, 0),
        }
        prop_assert_eq!(Frame::from(r), f);
    }

    #[test]
    fn header_blocks_read_back_pair_by_pair((pairs, block) in header_block()) {
        let f = Frame::Pub {
            flags: 0,
            subject: "a".into(),
            reply: None,
            headers: block,
            payload: vec![],
        };
        let buf = encode(&f);
        let (r, _) = decode(&buf, u32::MAX).unwrap().unwrap();
        let FrameRef::Pub { headers, .. } = r else { panic!("decoded {r:?}") };
        let back: Vec<(String, String)> =
            iter_headers(headers).map(|(k, v)| (k.into(), v.into())).collect();
        prop_assert_eq!(back, pairs);
    }

    #[test]
    fn concatenated_frames_decode_one_by_one(frames in vec(frame(), 1..8)) {
        let (buf, ends) = boundaries(&frames);
        let mut at = 0;
        let mut got = Vec::new();
        while at < buf.len() {
            let (r, used) = decode(&buf[at..], u32::MAX).unwrap().expect("whole frames only");
            got.push(Frame::from(r));
            at += used;
            prop_assert!(ends.contains(&at));
        }
        prop_assert_eq!(at, buf.len());
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn every_prefix_of_a_frame_asks_for_more_bytes(f in frame()) {
        let buf = encode(&f);
        for n in 0..buf.len() {
            prop_assert_eq!(decode(&buf[..n], u32::MAX), Ok(None), "prefix of {} bytes", n);
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..1024), max in any::<u32>()) {
        decode_all(&bytes, max);
    }

    /// Random bytes rarely get past the magic; this builds a plausible
    /// header in front of a random body so the body decoders get exercised.
    #[test]
    fn random_bodies_behind_valid_headers_never_panic(
        kind in 0u8..12,
        flags in any::<u8>(),
        body in vec(any::<u8>(), 0..512),
        len_delta in -4i64..4,
        hash in any::<u32>(),
    ) {
        let len = (body.len() as i64 + len_delta).max(0) as u32;
        let mut buf = Vec::new();
        buf.extend_from_slice(&MAGIC);
        buf.push(kind);
        buf.push(flags);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(&hash.to_le_bytes());
        buf.extend_from_slice(&body);
        decode_all(&buf, u32::MAX);
        let _ = aligned_prefix(&buf, body.len());
    }

    #[test]
    fn corrupted_frames_never_panic(f in frame(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut buf = encode(&f);
        let i = at.index(buf.len());
        buf[i] = byte;
        decode_all(&buf, u32::MAX);
    }
}

/// Decodes frames until an error or a partial frame, touching every field.
fn decode_all(mut buf: &[u8], max: u32) {
    while let Ok(Some((f, used))) = decode(buf, max) {
        assert!(used >= HEADER_LEN && used <= buf.len());
        if let FrameRef::Pub { headers, .. } | FrameRef::Msg { headers, .. } = f {
            for (k, v) in iter_headers(headers) {
                std::hint::black_box((k, v));
            }
        }
        let _ = Frame::from(f);
        buf = &buf[used..];
    }
}

// ------------------------------------------------------------ flow control

proptest! {
    #[test]
    fn aligned_prefix_cuts_at_the_last_frame_boundary_within_the_limit(
        frames in vec(frame(), 0..8),
        limit_pick in any::<prop::sample::Index>(),
        extra in 0usize..64,
    ) {
        let (buf, ends) = boundaries(&frames);
        let limit = limit_pick.index(buf.len() + 1) + extra.saturating_sub(32);
        let cut = aligned_prefix(&buf, limit);
        prop_assert!(cut <= limit);
        prop_assert!(ends.contains(&cut), "cut {} is not a frame boundary {:?}", cut, ends);
        let best = ends.iter().copied().filter(|&e| e <= limit).max().unwrap();
        prop_assert_eq!(cut, best);
    }
}

// ------------------------------------------------------------ subjects

const ALPHABET: &[&str] = &["a", "b", "c", "orders", "eu", "ü"];

fn token() -> impl Strategy<Value = String> {
    prop::sample::select(ALPHABET).prop_map(String::from)
}

fn subject_tokens() -> impl Strategy<Value = Vec<String>> {
    vec(token(), 1..=6)
}

/// A subject and a pattern derived from it: some tokens replaced by `*`,
/// and optionally the tail from some token on replaced by `>`.
fn subject_and_derived_pattern() -> impl Strategy<Value = (String, String)> {
    subject_tokens()
        .prop_flat_map(|toks| {
            let n = toks.len();
            (Just(toks), vec(any::<bool>(), n), option::of(0..n))
        })
        .prop_map(|(toks, stars, tail)| {
            let mut pat: Vec<String> = toks
                .iter()
                .zip(&stars)
                .map(|(t, &star)| if star { "*".to_string() } else { t.clone() })
                .collect();
            if let Some(k) = tail {
                pat.truncate(k);
                pat.push(">".into());
            }
            (toks.join("."), pat.join("."))
        })
}

/// Any valid pattern over the alphabet: literal and `*` tokens, maybe a final `>`.
fn pattern() -> impl Strategy<Value = String> {
    (
        vec(prop_oneof![3 => token(), 1 => Just("*".to_string())], 1..=6),
        any::<bool>(),
    )
        .prop_map(|(mut toks, tail)| {
            if tail {
                *toks.last_mut().unwrap() = ">".into();
            }
            toks.join(".")
        })
}

/// Reference matcher, written from the NATS rules and nothing else.
fn reference_matches(pattern: &[&str], subject: &[&str]) -> bool {
    match (pattern.split_first(), subject.split_first()) {
        (None, None) => true,
        (Some((&">", _)), Some(_)) => true,
        (Some((&"*", p)), Some((_, s))) => reference_matches(p, s),
        (Some((pt, p)), Some((st, s))) => pt == st && reference_matches(p, s),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn derived_patterns_are_valid_and_match_their_subject((subject, pat) in subject_and_derived_pattern()) {
        prop_assert_eq!(validate_subject(&subject), Ok(()));
        prop_assert_eq!(validate_pattern(&pat), Ok(()));
        prop_assert!(matches(&pat, &subject), "{} should match {}", pat, subject);
    }

    #[test]
    fn matcher_agrees_with_the_reference(pat in pattern(), subject in subject_tokens()) {
        let subject = subject.join(".");
        let p: Vec<&str> = pat.split('.').collect();
        let s: Vec<&str> = subject.split('.').collect();
        prop_assert_eq!(matches(&pat, &subject), reference_matches(&p, &s), "{} vs {}", pat, subject);
    }

    #[test]
    fn publish_subjects_with_a_wildcard_token_are_refused(
        toks in subject_tokens(),
        at in any::<prop::sample::Index>(),
        wildcard in prop::sample::select(&["*", ">"][..]),
    ) {
        let mut toks = toks;
        let i = at.index(toks.len() + 1);
        toks.insert(i, wildcard.to_string());
        let subject = toks.join(".");
        prop_assert!(validate_subject(&subject).is_err(), "{} was accepted", subject);
    }
}

// ------------------------------------------------------------ PUB with room

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The room is skipped whatever it holds: a PUB with room decodes to
    /// the fields of the same PUB without it.
    #[test]
    fn a_pub_with_room_decodes_the_same_whatever_its_room_holds(
        room in any::<[u8; 4]>(),
        ack in any::<bool>(),
        subject in text(100),
        reply in opt_text(100),
        (_, headers) in header_block(),
        payload in payload(),
    ) {
        let ack = if ack { PUB_ACK } else { 0 };
        let mut with = Vec::new();
        encode_pub_flags(&mut with, ack | PUB_ROOM, &subject, reply.as_deref(), &headers, &payload).unwrap();
        with[HEADER_LEN..HEADER_LEN + PUB_ROOM_LEN].copy_from_slice(&room);
        let mut without = Vec::new();
        encode_pub_flags(&mut without, ack, &subject, reply.as_deref(), &headers, &payload).unwrap();
        prop_assert_eq!(with.len(), without.len() + PUB_ROOM_LEN);
        prop_assert_eq!(with.len(), pub_frame_len(ack | PUB_ROOM, &subject, reply.as_deref(), &headers, &payload));
        let (a, used) = decode(&with, u32::MAX).unwrap().unwrap();
        prop_assert_eq!(used, with.len());
        let (b, _) = decode(&without, u32::MAX).unwrap().unwrap();
        let (FrameRef::Pub { flags: fa, subject: sa, reply: ra, headers: ha, payload: pa },
             FrameRef::Pub { flags: fb, subject: sb, reply: rb, headers: hb, payload: pb }) = (a, b)
        else { panic!("decoded {a:?} and {b:?}") };
        prop_assert_eq!(fa, fb | PUB_ROOM);
        prop_assert_eq!((sa, ra, ha, pa), (sb, rb, hb, pb));
    }

    /// What the kernel does to a PUB with room (kind MSG, flags 0, the sid
    /// into the room; length and hash kept) gives exactly the MSG the broker
    /// encodes for that subscription.
    #[test]
    fn a_pub_with_room_rewritten_in_place_is_the_brokers_msg(
        sid in any::<u32>(),
        room in any::<[u8; 4]>(),
        subject in text(100),
        reply in opt_text(100),
        (_, headers) in header_block(),
        payload in payload(),
    ) {
        let mut f = Vec::new();
        encode_pub_flags(&mut f, PUB_ROOM, &subject, reply.as_deref(), &headers, &payload).unwrap();
        f[HEADER_LEN..HEADER_LEN + PUB_ROOM_LEN].copy_from_slice(&room);
        f[2] = Kind::Msg as u8;
        f[3] = 0;
        f[HEADER_LEN..HEADER_LEN + PUB_ROOM_LEN].copy_from_slice(&sid.to_le_bytes());
        let mut want = Vec::new();
        encode_msg(&mut want, sid, 0, &subject, subject_hash(subject.as_bytes()), reply.as_deref(), &headers, &payload);
        prop_assert_eq!(f, want);
    }

    /// A PUB with the room flag whose body is shorter than the room, or
    /// whose room is followed by garbage, is an error, never a panic or a
    /// wrong frame.
    #[test]
    fn a_pub_with_the_room_flag_and_a_short_or_bad_body_is_an_error(
        body in vec(any::<u8>(), 0..PUB_ROOM_LEN + 2),
    ) {
        let mut f = Vec::new();
        sockbus_protocol::Header { kind: Kind::Pub, flags: PUB_ROOM, len: body.len() as u32, hash: 0 }.write(&mut f);
        f.extend_from_slice(&body);
        prop_assert!(decode(&f, u32::MAX).is_err());
    }
}
