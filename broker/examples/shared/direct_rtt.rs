//! Request/reply round trips at the kernel level, three ways, for
//! `accel_bench --direct-kernel`: through a userspace relay over plain TCP,
//! through the relay with the fast path, and direct (both routes installed in
//! the kernel, the relay never sees a frame). The relay stands in for the
//! broker (it forwards each PUB as the MSG the broker would send), because
//! the broker does not install direct routes yet.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sockbus_broker::accel::direct::socket_keys;
use sockbus_broker::accel::{AttachOptions, FastPath};
use sockbus_protocol::frame::{encode_msg, encode_pub, parse_header, HEADER_LEN};
use sockbus_protocol::subject::subject_hash;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    TcpRelay,
    FastPathRelay,
    Direct,
}

fn read_frame(s: &mut TcpStream, f: &mut Vec<u8>) -> bool {
    f.resize(HEADER_LEN, 0);
    if s.read_exact(&mut f[..HEADER_LEN]).is_err() {
        return false;
    }
    let h = parse_header(&f[..HEADER_LEN]).unwrap().unwrap();
    f.resize(HEADER_LEN + h.len as usize, 0);
    s.read_exact(&mut f[HEADER_LEN..]).is_ok()
}

/// Forwards PUB frames from `from` to `to` as MSG frames with `sid`.
fn relay(mut from: TcpStream, mut to: TcpStream, sid: u32) {
    let mut f = Vec::new();
    let mut out = BytesMut::new();
    while read_frame(&mut from, &mut f) {
        let b = &f[HEADER_LEN..];
        let sl = u16::from_le_bytes([b[0], b[1]]) as usize;
        let subject = std::str::from_utf8(&b[2..2 + sl]).unwrap();
        let rl = u16::from_le_bytes([b[2 + sl], b[3 + sl]]) as usize;
        let reply = std::str::from_utf8(&b[4 + sl..4 + sl + rl]).unwrap();
        let payload = &b[4 + sl + rl + 4..];
        out.clear();
        let reply = (!reply.is_empty()).then_some(reply);
        encode_msg(
            &mut out,
            sid,
            0,
            subject,
            subject_hash(subject.as_bytes()),
            reply,
            &[],
            payload,
        );
        if to.write_all(&out).is_err() {
            return;
        }
    }
}

/// p50 of `n` round trips of `size`-byte payloads.
pub fn run(mode: Mode, n: usize, size: usize, cgroup: &std::path::Path) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let fp = (mode != Mode::TcpRelay).then(|| {
        FastPath::attach(&AttachOptions {
            ports: vec![port],
            cgroup: Some(cgroup.to_path_buf()),
            max_sockets: None,
        })
        .expect("attach the fast path (run as root)")
    });
    let mut maps = fp.as_ref().map(|fp| fp.direct().expect("direct maps"));
    if let Some(m) = maps.as_mut() {
        m.set_enabled(mode == Mode::Direct).unwrap();
    }
    let conn = || {
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (b, _) = l.accept().unwrap();
        c.set_nodelay(true).unwrap();
        b.set_nodelay(true).unwrap();
        (c, b)
    };
    let (mut req, req_b) = conn();
    let (mut svc, svc_b) = conn();
    if let (Some(m), Mode::Direct) = (maps.as_mut(), mode) {
        let (rk, sk) = (socket_keys(&req).unwrap().0, socket_keys(&svc).unwrap().0);
        // sock_ops inserts the keys a moment after the handshake.
        let t = Instant::now();
        while m.publisher(&rk).is_none() || m.publisher(&sk).is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "sock_ops did not run"
            );
            std::thread::yield_now();
        }
        m.add_route("svc.rtt", sk, 1).unwrap();
        m.add_route("inbox.rtt", rk, 2).unwrap();
        for k in [rk, sk] {
            m.allow(k).unwrap();
            m.set_done(k, 0).unwrap();
            m.grant(k, u64::MAX / 2).unwrap();
        }
    }
    let (a, b) = (req_b.try_clone().unwrap(), svc_b.try_clone().unwrap());
    let ctl = [req_b.try_clone().unwrap(), svc_b.try_clone().unwrap()];
    let t1 = std::thread::spawn(move || relay(a, b, 1));
    let t2 = std::thread::spawn(move || relay(svc_b, req_b, 2));
    let svc_thread = std::thread::spawn(move || {
        let mut f = Vec::new();
        let mut out = BytesMut::new();
        let payload = vec![7u8; size];
        while read_frame(&mut svc, &mut f) {
            out.clear();
            encode_pub(&mut out, "inbox.rtt", None, &[], &payload).unwrap();
            if svc.write_all(&out).is_err() {
                return;
            }
        }
    });
    let mut out = BytesMut::new();
    encode_pub(
        &mut out,
        "svc.rtt",
        Some("inbox.rtt"),
        &[],
        &vec![1u8; size],
    )
    .unwrap();
    let mut f = Vec::new();
    let warm = 1000;
    let mut lat = Vec::with_capacity(n + warm);
    for _ in 0..n + warm {
        let t = Instant::now();
        req.write_all(&out).unwrap();
        assert!(read_frame(&mut req, &mut f), "reply");
        lat.push(t.elapsed());
    }
    if let Some(m) = maps.as_ref() {
        if mode == Mode::Direct {
            let k = socket_keys(&req).unwrap().0;
            let st = m.publisher(&k).unwrap();
            assert!(
                st.direct_msgs as usize >= n,
                "only {} of {} requests went direct",
                st.direct_msgs,
                n + warm
            );
        }
    }
    drop(req);
    for s in &ctl {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    drop(fp);
    let _ = (t1.join(), t2.join(), svc_thread.join());
    let mut lat = lat.split_off(warm);
    lat.sort_unstable();
    lat[lat.len() / 2].as_secs_f64() * 1e6
}
