//! sockbus same-node fast path, kernel side.
//!
//! `sockbus_sock_ops` (cgroup sock_ops) puts every established TCP socket
//! whose local or remote port is one of the broker's ports into a socket
//! hash. `sockbus_sk_msg` (attached to that hash, so it only ever runs for
//! those sockets) hands each sendmsg straight to the peer socket's receive
//! queue, skipping TCP/IP; when the peer is not in the hash it lets the data
//! go over TCP as usual. Everything else (routing, flow control, delivery
//! guarantees) stays in the broker and the protocol.
//!
//! Built for the host target as LLVM bitcode and turned into BPF by
//! bpf-linker (see build.sh). Context fields are read one `u32` at a time
//! with volatile loads: the verifier refuses wider or merged context loads.
#![no_std]

use core::mem::MaybeUninit;
use core::ptr::{addr_of, read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, Ordering};

use aya_ebpf::bindings::{bpf_sock_ops, sk_action, sk_msg_md, BPF_F_INGRESS};
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_msg_apply_bytes, bpf_msg_pull_data};
use aya_ebpf::macros::{map, sk_msg, sock_ops};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash};
use aya_ebpf::programs::{SkMsgContext, SockOpsContext};
use aya_ebpf::EbpfContext;
use sockbus_accel_common::{
    DirectCount, DirectPub, DirectRoute, DirectSub, SockKey, Stats, BROKER_RUN_FRAMES,
    DIRECT_CONFIG_INDEX, DIRECT_FRAME_MAX, DIRECT_MAX_ENTRIES, DIRECT_PUB_BROKEN,
    DIRECT_ROOM_RUN_FRAMES, DIRECT_RUN_FRAMES, DIRECT_SUBJECT_MAX, PORTS_MAX_ENTRIES,
    SOCKS_MAX_ENTRIES, STATS_INDEX, VERDICT_BYTES,
};

#[map(name = "SOCKBUS_SOCKS")]
static SOCKS: SockHash<SockKey> = SockHash::with_max_entries(SOCKS_MAX_ENTRIES, 0);

/// Ports (host byte order) whose connections are accelerated; filled by the
/// loader. 0 = every port.
#[map(name = "SOCKBUS_PORTS")]
static PORTS: HashMap<u32, u32> = HashMap::with_max_entries(PORTS_MAX_ENTRIES, 0);

#[map(name = "SOCKBUS_STATS")]
static STATS: PerCpuArray<Stats> = PerCpuArray::with_max_entries(1, 0);

/// Direct delivery switch (index [`DIRECT_CONFIG_INDEX`]), set by the loader.
#[map(name = "SOCKBUS_DIRECT_CONFIG")]
static DIRECT_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// Publisher state by the publisher's socket; present = per-frame verdicts.
#[map(name = "SOCKBUS_DIRECT_PUBS")]
static DIRECT_PUBS: LruHashMap<SockKey, DirectPub> =
    LruHashMap::with_max_entries(DIRECT_MAX_ENTRIES, 0);

/// Publisher sockets the broker lets go direct (unrestricted publishers).
#[map(name = "SOCKBUS_DIRECT_ALLOW")]
static DIRECT_ALLOW: HashMap<SockKey, u32> = HashMap::with_max_entries(DIRECT_MAX_ENTRIES, 0);

/// Per publisher socket: bytes of its sends the broker has read, handled and
/// whose messages it has written into the kernel. A frame goes direct only
/// when this equals `DirectPub::passed` (nothing of this publisher is still
/// inside the broker): the ordering barrier.
#[map(name = "SOCKBUS_DIRECT_DONE")]
static DIRECT_DONE: HashMap<SockKey, u64> = HashMap::with_max_entries(DIRECT_MAX_ENTRIES, 0);

#[map(name = "SOCKBUS_DIRECT_ROUTES")]
static DIRECT_ROUTES: HashMap<u32, DirectRoute> = HashMap::with_max_entries(DIRECT_MAX_ENTRIES, 0);

/// Per subscriber socket: MSG bytes it may be sent directly, ever (the
/// broker raises it as the subscriber grants credit).
#[map(name = "SOCKBUS_DIRECT_GRANT")]
static DIRECT_GRANT: HashMap<SockKey, u64> = HashMap::with_max_entries(DIRECT_MAX_ENTRIES, 0);

#[map(name = "SOCKBUS_DIRECT_SUBS")]
static DIRECT_SUBS: LruHashMap<SockKey, DirectSub> =
    LruHashMap::with_max_entries(DIRECT_MAX_ENTRIES, 0);

#[map(name = "SOCKBUS_DIRECT_SUBJECTS")]
static DIRECT_SUBJECTS: LruHashMap<u32, DirectCount> =
    LruHashMap::with_max_entries(DIRECT_MAX_ENTRIES, 0);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_OPS_ACTIVE_ESTABLISHED: u32 = 4;
const SOCK_OPS_PASSIVE_ESTABLISHED: u32 = 5;
/// 0x0000ffff in network byte order, as the third word of an IPv4-mapped address.
const V4_MAPPED_WORD: u32 = 0xffff_0000;

#[inline(always)]
fn stat(f: impl FnOnce(&Stats) -> *const u64, n: u64) {
    if let Some(p) = STATS.get_ptr_mut(STATS_INDEX) {
        // Per-CPU, but a program may be preempted by another on the same CPU:
        // an atomic add keeps every count.
        let field = f(unsafe { &*p });
        unsafe { AtomicU64::from_ptr(field as *mut u64) }.fetch_add(n, Ordering::Relaxed);
    }
}

#[inline(always)]
fn ld(p: *const u32) -> u32 {
    unsafe { read_volatile(p) }
}

#[inline(always)]
fn mapped_v4(ip: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip]
}

#[inline(always)]
fn is_loopback(ip: &[u32; 4]) -> bool {
    // IPv4-mapped 127.0.0.0/8 (first byte of the address is 127), or ::1.
    (ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD && (ip[3] & 0xff) == 127)
        || (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::to_be(1))
}

/// Port 0 in the set stands for every port (for a dedicated cgroup whose
/// every connection should be accelerated, as the test suite does).
#[inline(always)]
fn ports_match(local: u32, remote: u32) -> bool {
    unsafe {
        PORTS.get(local).is_some() || PORTS.get(remote).is_some() || PORTS.get(0u32).is_some()
    }
}

/// Reads the addresses of a socket from a sock_ops or sk_msg context: both
/// lay out family, remote_ip4, local_ip4, remote_ip6[4], local_ip6[4],
/// remote_port (network order, in the upper 16 bits), local_port (host order).
///
/// Every field is loaded unconditionally and only the values are chosen by
/// family: loads in both arms of a branch get merged by LLVM into one load
/// through a computed context pointer, which the verifier refuses.
#[inline(always)]
fn key_of(
    family: *const u32,
    remote_ip4: *const u32,
    local_ip4: *const u32,
    remote_ip6: *const [u32; 4],
    local_ip6: *const [u32; 4],
    remote_port: *const u32,
    local_port: *const u32,
) -> Option<SockKey> {
    let family = ld(family);
    let l4 = ld(local_ip4);
    let r4 = ld(remote_ip4);
    let l = local_ip6 as *const u32;
    let r = remote_ip6 as *const u32;
    let (l6, r6) = unsafe {
        (
            [ld(l), ld(l.add(1)), ld(l.add(2)), ld(l.add(3))],
            [ld(r), ld(r.add(1)), ld(r.add(2)), ld(r.add(3))],
        )
    };
    let lport = ld(local_port);
    let rport = u32::from_be(ld(remote_port));
    let (local_ip, remote_ip) = match family {
        AF_INET => (mapped_v4(l4), mapped_v4(r4)),
        AF_INET6 => (l6, r6),
        _ => return None,
    };
    Some(SockKey {
        local_ip,
        remote_ip,
        local_port: lport,
        remote_port: rport,
        netns: 0,
    })
}

#[sock_ops]
pub fn sockbus_sock_ops(ctx: SockOpsContext) -> u32 {
    let o: *const bpf_sock_ops = ctx.ops;
    let op = ld(unsafe { addr_of!((*o).op) });
    if op != SOCK_OPS_ACTIVE_ESTABLISHED && op != SOCK_OPS_PASSIVE_ESTABLISHED {
        return 1;
    }
    let key = unsafe {
        key_of(
            addr_of!((*o).family),
            addr_of!((*o).remote_ip4),
            addr_of!((*o).local_ip4),
            addr_of!((*o).remote_ip6),
            addr_of!((*o).local_ip6),
            addr_of!((*o).remote_port),
            addr_of!((*o).local_port),
        )
    };
    let Some(mut key) = key else { return 1 };
    if !ports_match(key.local_port, key.remote_port) {
        return 1;
    }
    if is_loopback(&key.local_ip) {
        key.netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    }
    // BPF_ANY: a reused 4-tuple replaces a stale entry.
    match SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, 0) {
        Ok(()) => stat(|s| &s.sockets_added, 1),
        Err(_) => {
            return {
                stat(|s| &s.add_failures, 1);
                1
            }
        }
    }
    // Direct delivery: a client's end of a connection to the broker starts
    // in per-frame mode before its first byte, so the program's verdicts
    // stay on frame boundaries for the connection's whole life.
    let direct = DIRECT_CONFIG.get(DIRECT_CONFIG_INDEX).copied().unwrap_or(0);
    if direct != 0 && unsafe { PORTS.get(key.remote_port).is_some() } {
        // BPF_ANY: a reused 4-tuple starts afresh.
        let v = MaybeUninit::<DirectPub>::uninit();
        let p = v.as_ptr() as *mut u64;
        // Field by field: a zeroed struct would become a memset call, which
        // the verifier refuses (it returns a stack pointer).
        for i in 0..(core::mem::size_of::<DirectPub>() / 8) {
            unsafe { write_volatile(p.add(i), 0) };
        }
        let _ = DIRECT_PUBS.insert(&key, unsafe { &*v.as_ptr() }, 0);
    }
    1
}

#[sk_msg]
pub fn sockbus_sk_msg(ctx: SkMsgContext) -> u32 {
    let m: *const sk_msg_md = ctx.msg;
    let key = unsafe {
        key_of(
            addr_of!((*m).family),
            addr_of!((*m).remote_ip4),
            addr_of!((*m).local_ip4),
            addr_of!((*m).remote_ip6),
            addr_of!((*m).local_ip6),
            addr_of!((*m).remote_port),
            addr_of!((*m).local_port),
        )
    };
    let Some(mut key) = key else {
        return sk_action::SK_PASS;
    };
    // The peer's key is ours seen from the other end.
    let mut peer = SockKey {
        local_ip: key.remote_ip,
        remote_ip: key.local_ip,
        local_port: key.remote_port,
        remote_port: key.local_port,
        netns: 0,
    };
    if is_loopback(&peer.local_ip) {
        peer.netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    }
    let size = ld(unsafe { addr_of!((*m).size) });
    // Our own key, as sock_ops inserted it (only direct delivery needs it).
    if is_loopback(&key.local_ip) {
        key.netns = if peer.netns != 0 {
            peer.netns
        } else {
            unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
        };
    }
    if let Some(st) = DIRECT_PUBS.get_ptr_mut(&key) {
        if unsafe { (*st).flags } & DIRECT_PUB_BROKEN == 0 {
            return per_frame(&ctx, &key, &mut peer, st, size);
        }
    }
    // On a miss the helper answers SK_DROP, which would discard the data:
    // pass it to TCP instead.
    if SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == sk_action::SK_PASS as i64 {
        // The peer never changes: let this verdict stand for this message
        // and the next VERDICT_BYTES of the connection's sends (the kernel
        // redirects them without running this program; a miss is never
        // cached). Covering the whole message keeps a large send in one
        // piece.
        //
        // Not for the broker's end while direct delivery is on: publishers'
        // frames may land in the client's receive queue, and a verdict
        // that ran out inside one of the broker's sends would cut it
        // wherever that is, inside a frame, for the kernel to redirect the
        // rest apart (another sender's frame could land in between). The
        // broker's sends to such a client end on frame boundaries: one
        // verdict for exactly each keeps every frame whole.
        let direct = DIRECT_CONFIG.get(DIRECT_CONFIG_INDEX).copied().unwrap_or(0);
        let grant = if direct != 0 && unsafe { PORTS.get(key.local_port).is_some() } {
            size
        } else {
            size.saturating_add(VERDICT_BYTES)
        };
        unsafe { bpf_msg_apply_bytes(ctx.msg, grant) };
        stat(|s| &s.redirect_verdicts, 1);
        stat(|s| &s.bytes_redirected, grant as u64);
    } else {
        stat(|s| &s.misses, 1);
    }
    sk_action::SK_PASS
}

#[inline(always)]
fn add(p: *mut u64, n: u64) {
    unsafe { AtomicU64::from_ptr(p) }.fetch_add(n, Ordering::Relaxed);
}

/// Out of the linear part of the message (no `Option`s: LLVM leaves the
/// value of a `None` uninitialised in registers it later spills, and the
/// verifier refuses reading those).
const OUT: u32 = u32::MAX;

/// Byte `off` of the message, or [`OUT`].
#[inline(always)]
fn byte(ctx: &SkMsgContext, off: usize) -> u32 {
    let (d, e) = (ctx.data(), ctx.data_end());
    if d + off + 1 > e {
        return OUT;
    }
    unsafe { read_volatile((d + off) as *const u8) as u32 }
}

/// Little-endian u16 at `off`, or [`OUT`].
#[inline(always)]
fn le16(ctx: &SkMsgContext, off: usize) -> u32 {
    let (d, e) = (ctx.data(), ctx.data_end());
    if d + off + 2 > e {
        return OUT;
    }
    let p = (d + off) as *const u8;
    unsafe { read_volatile(p) as u32 | (read_volatile(p.add(1)) as u32) << 8 }
}

const KIND_PUB: u8 = 3;
const KIND_MSG: u8 = 6;
const KIND_MAX: u8 = 32;
const HEADER: u32 = 12;
/// PUB flag: [`ROOM`] bytes of room for the sid precede the subject
/// (docs/protocol.md, PUB).
const PUB_ROOM: u8 = 0x02;
/// A MSG's sid, and a PUB's room for it.
const ROOM: usize = 4;

/// The frame at the start of `msg` goes to the broker, and with it every
/// whole frame after it whose header lies in the message's first
/// scatterlist element (`win` bytes, as the program found it), up to
/// [`BROKER_RUN_FRAMES`]: one verdict for the run (`bpf_msg_apply_bytes`,
/// set on every path, ending on a frame boundary; a last frame longer than
/// this send keeps the verdict into the next send, so the next run starts on
/// the next frame's header). None of those frames could go direct anyway:
/// once this run is handed to the broker, `passed` is ahead of what the
/// broker has done until it has read them (the ordering barrier).
///
/// A function of its own (a BPF subprogram, `size` and `win` packed into
/// one argument: five at most), called from one place: inlined at every way
/// a frame can fall back, its loop made the verifier's work too large.
#[inline(never)]
fn to_broker(
    msg: *mut sk_msg_md,
    peer: &mut SockKey,
    st: *mut DirectPub,
    frame: u32,
    size_win: u64,
) -> u32 {
    let ctx = &SkMsgContext::new(msg);
    let (size, win) = ((size_win >> 32) as u32, size_win as u32);
    // No branch depends on the counts (a conditional count, or a
    // saturating add, would give the verifier one state per value at every
    // step of the loop): u64 sums, PUBs added to the map as they come.
    let mut total = frame as u64;
    let mut frames = 1u64;
    let fallbacks = unsafe { addr_of!((*st).fallbacks) } as *mut u64;
    let mut i = 0;
    while i < BROKER_RUN_FRAMES {
        // Only headers inside the first element: there the pull below
        // moves the window and copies nothing.
        if total >= size as u64 || total + HEADER as u64 > win as u64 {
            break;
        }
        let off = total as u32;
        if unsafe { bpf_msg_pull_data(ctx.msg, off, off + HEADER, 0) } != 0 {
            break;
        }
        let (m0, m1, kind) = (byte(ctx, 0), byte(ctx, 1), byte(ctx, 2));
        let (l0, l1) = (le16(ctx, 4), le16(ctx, 6));
        if m0 != b'S' as u32
            || m1 != b'B' as u32
            || kind == 0
            || kind > KIND_MAX as u32
            || l0 == OUT
            || l1 == OUT
        {
            // The next run finds it and gives up on alignment.
            break;
        }
        total += (l0 | l1 << 16) as u64 + HEADER as u64;
        frames += 1;
        if kind == KIND_PUB as u32 {
            add(fallbacks, 1);
        }
        i += 1;
    }
    let total = if total > u32::MAX as u64 {
        u32::MAX
    } else {
        total as u32
    };
    add(unsafe { addr_of!((*st).passed) } as *mut u64, total as u64);
    unsafe { bpf_msg_apply_bytes(ctx.msg, total) };
    stat(|s| &s.direct_fallbacks, frames);
    if SOCKS.redirect_msg(ctx, peer, BPF_F_INGRESS as u64) == sk_action::SK_PASS as i64 {
        stat(|s| &s.redirect_verdicts, 1);
        stat(|s| &s.bytes_redirected, total as u64);
    } else {
        stat(|s| &s.misses, 1);
    }
    sk_action::SK_PASS
}

/// Frame alignment is lost (a header split over two sends, or bytes that are
/// no sockbus header): the connection goes through the broker for good, with
/// the plain fast path's verdicts.
#[inline(always)]
fn broken(ctx: &SkMsgContext, peer: &mut SockKey, st: *mut DirectPub, size: u32) -> u32 {
    unsafe { (*st).flags |= DIRECT_PUB_BROKEN };
    stat(|s| &s.direct_broken, 1);
    let grant = size.saturating_add(VERDICT_BYTES);
    unsafe { bpf_msg_apply_bytes(ctx.msg, grant) };
    if SOCKS.redirect_msg(ctx, peer, BPF_F_INGRESS as u64) == sk_action::SK_PASS as i64 {
        stat(|s| &s.redirect_verdicts, 1);
        stat(|s| &s.bytes_redirected, grant as u64);
    } else {
        stat(|s| &s.misses, 1);
    }
    sk_action::SK_PASS
}

/// Per-frame verdicts for a publisher in direct mode: `msg` starts with a
/// frame header. A PUB goes straight into its subscriber's socket as MSG only
/// when every condition holds; anything else goes to the broker, one frame
/// per verdict.
#[inline(always)]
fn per_frame(
    ctx: &SkMsgContext,
    key: &SockKey,
    peer: &mut SockKey,
    st: *mut DirectPub,
    size: u32,
) -> u32 {
    // The first scatterlist element, before any pull narrows the window.
    let win = (ctx.data_end() - ctx.data()) as u32;
    let mut frame = 0u32;
    let r = classify(ctx, key, peer, st, size, &mut frame);
    if r != TO_BROKER {
        return r;
    }
    to_broker(ctx.msg, peer, st, frame, (size as u64) << 32 | win as u64)
}

/// [`per_frame`]'s answer when the frame at the start of `msg` (its length
/// in `frame_out`) goes to the broker.
const TO_BROKER: u32 = u32::MAX;

/// Sends the frame at the start of `msg`, and the PUBs to the same route
/// right behind it, direct if it may go, or answers [`TO_BROKER`].
#[inline(always)]
fn classify(
    ctx: &SkMsgContext,
    key: &SockKey,
    peer: &mut SockKey,
    st: *mut DirectPub,
    size: u32,
    frame_out: &mut u32,
) -> u32 {
    if size < HEADER {
        return broken(ctx, peer, st, size);
    }
    if ctx.data() + HEADER as usize > ctx.data_end()
        && unsafe { bpf_msg_pull_data(ctx.msg, 0, HEADER, 0) } != 0
    {
        return broken(ctx, peer, st, size);
    }
    let (d, e) = (ctx.data(), ctx.data_end());
    if d + HEADER as usize > e {
        return broken(ctx, peer, st, size);
    }
    let h = d as *const u8;
    let b = |i: usize| unsafe { read_volatile(h.add(i)) } as u32;
    let (m0, m1, kind) = (b(0), b(1), b(2));
    let len = b(4) | b(5) << 8 | b(6) << 16 | b(7) << 24;
    let hash = b(8) | b(9) << 8 | b(10) << 16 | b(11) << 24;
    if m0 != b'S' as u32 || m1 != b'B' as u32 || kind == 0 || kind > KIND_MAX as u32 {
        return broken(ctx, peer, st, size);
    }
    let frame = len.saturating_add(HEADER);
    *frame_out = frame;
    if kind != KIND_PUB as u32 {
        return TO_BROKER;
    }
    // A PUB with room for the sid becomes a MSG in place; one without
    // gets 4 bytes pushed for it.
    if b(3) & PUB_ROOM as u32 != 0 {
        direct_pub::<ROOM>(ctx, key, st, size, len, hash, frame)
    } else {
        direct_pub::<0>(ctx, key, st, size, len, hash, frame)
    }
}

/// The PUB frame at the start of `msg` (`len` body bytes, subject hash
/// `hash`, `frame` bytes in all), `R` bytes of room for the sid in front of
/// its subject ([`ROOM`] or 0): sends it and the PUBs of the same kind to the
/// same route right behind it direct if it may go, or answers [`TO_BROKER`].
#[inline(always)]
fn direct_pub<const R: usize>(
    ctx: &SkMsgContext,
    key: &SockKey,
    st: *mut DirectPub,
    size: u32,
    len: u32,
    hash: u32,
    frame: u32,
) -> u32 {
    // From here on a fallback counts for the publisher too.
    let fallback = || {
        add(unsafe { addr_of!((*st).fallbacks) } as *mut u64, 1);
        TO_BROKER
    };
    // Whole in this send, and small enough to stay contiguous.
    if frame > size || frame > DIRECT_FRAME_MAX {
        return fallback();
    }
    let Some(route) = DIRECT_ROUTES.get_ptr_mut(hash) else {
        return fallback();
    };
    // A reference into the map value: copying the route to the stack would
    // be a memcpy call.
    let route = unsafe { &mut *route };
    // Never to the publisher itself (no-echo connections).
    if route.sub == *key {
        return fallback();
    }
    // Permissions: only publishers the broker marked unrestricted.
    if unsafe { DIRECT_ALLOW.get(key) }.is_none() {
        return fallback();
    }
    // The ordering barrier: nothing this publisher sent earlier is still
    // inside the broker.
    let passed = unsafe { read_volatile(addr_of!((*st).passed)) };
    match unsafe { DIRECT_DONE.get(key) } {
        Some(done) if *done == passed => {}
        _ => return fallback(),
    }
    // Body: str16 subject, str16 reply, u32 headers length, headers, payload.
    let slen = route.subject_len as usize;
    if slen == 0 || slen > DIRECT_SUBJECT_MAX {
        return fallback();
    }
    let want = (HEADER as usize + R + 2 + slen + 2 + DIRECT_SUBJECT_MAX + 4).min(frame as usize);
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, want as u32, 0) } != 0 {
        return fallback();
    }
    if le16(ctx, 12 + R) as usize != slen {
        return fallback();
    }
    // The subject bytes, not just the 32-bit hash. `max` is 128 to the
    // verifier (a constant spilled to the stack) but opaque to LLVM, which
    // would otherwise drop the index check the verifier needs for the
    // route's array (it knows `slen <= 128` from above; the verifier does
    // not keep that relation).
    let max_slot = DIRECT_SUBJECT_MAX;
    let max = unsafe { read_volatile(&max_slot) };
    let mut i = 0usize;
    while i < slen {
        if i >= max {
            return fallback();
        }
        let want_b = unsafe { *route.subject.as_ptr().add(i) } as u32;
        if byte(ctx, 14 + R + i) != want_b {
            return fallback();
        }
        i += 1;
    }
    // Offsets after a loop are recomputed from fresh loads: the loop's exit
    // test pins the length to the iteration count, and offsets derived from
    // it would give the verifier one state per length (128 x 128 paths).
    let roff = 14 + R + (unsafe { read_volatile(addr_of!(route.subject_len)) } as usize & 0xff);
    let rlen = le16(ctx, roff);
    if rlen == OUT {
        return fallback();
    }
    let rlen = rlen as usize;
    if rlen > DIRECT_SUBJECT_MAX {
        return fallback();
    }
    let mut prev = b'.' as u32;
    let mut j = 0usize;
    while j < DIRECT_SUBJECT_MAX {
        if j >= rlen {
            break;
        }
        let b = byte(ctx, roff + 2 + j);
        let dot = b'.' as u32;
        // OUT (> 0x7f) fails too.
        if b <= b' ' as u32
            || b >= 0x7f
            || b == b'*' as u32
            || b == b'>' as u32
            || (b == dot && prev == dot)
        {
            return fallback();
        }
        prev = b;
        j += 1;
    }
    if rlen > 0 && prev == b'.' as u32 {
        return fallback();
    }
    // No headers (the broker checks them).
    let rlen2 = le16(ctx, roff);
    if rlen2 == OUT {
        return fallback();
    }
    let hoff = roff + 2 + (rlen2 as usize & 0xff);
    if le16(ctx, hoff) != 0 || le16(ctx, hoff + 2) != 0 {
        return fallback();
    }
    // Flow control: the subscriber's budget.
    let msg_len = frame as u64 + (ROOM - R) as u64;
    let Some(grant) = (unsafe { DIRECT_GRANT.get(&route.sub) }) else {
        return fallback();
    };
    let grant = *grant;
    let sub = match DIRECT_SUBS.get_ptr_mut(&route.sub) {
        Some(p) => p,
        None => {
            let v = MaybeUninit::<DirectSub>::uninit();
            let p = v.as_ptr() as *mut u64;
            unsafe {
                write_volatile(p, 0);
                write_volatile(p.add(1), 0);
            }
            // BPF_NOEXIST: another CPU may have created it meanwhile.
            let _ = DIRECT_SUBS.insert(&route.sub, unsafe { &*v.as_ptr() }, 1);
            match DIRECT_SUBS.get_ptr_mut(&route.sub) {
                Some(p) => p,
                None => return fallback(),
            }
        }
    };
    // Checked, then added once the run is on its way: two CPUs sending to
    // one subscriber at once may overshoot the grant by a run each.
    let used = unsafe { addr_of!((*sub).used) } as *mut u64;
    if unsafe { read_volatile(used) }.saturating_add(msg_len) > grant {
        return fallback();
    }
    let sid = route.sid;
    if SOCKS.redirect_msg(ctx, &mut route.sub, BPF_F_INGRESS as u64) != sk_action::SK_PASS as i64 {
        return fallback();
    }
    // PUB -> MSG: 4 bytes for the sid after the header (the PUB's room, or
    // pushed), new kind and length. to_broker redirects again, to the
    // broker: the frame is still a PUB when the push failed, and again once
    // the pushed bytes are popped.
    if R == 0 {
        if ctx.push_data(HEADER, ROOM as u32, 0).is_err() {
            return fallback();
        }
        if unsafe { bpf_msg_pull_data(ctx.msg, 0, HEADER + ROOM as u32, 0) } != 0
            || ctx.data() + (HEADER as usize + ROOM) > ctx.data_end()
        {
            let _ = ctx.pop_data(HEADER, ROOM as u32, 0);
            return fallback();
        }
    } else if ctx.data() + (HEADER as usize + ROOM) > ctx.data_end() {
        // Pulled above (the subject follows the room).
        return fallback();
    }
    let d = ctx.data() as *mut u8;
    let new_len = len + (ROOM - R) as u32;
    unsafe {
        *d.add(2) = KIND_MSG;
        *d.add(3) = 0;
        *d.add(4) = new_len as u8;
        *d.add(5) = (new_len >> 8) as u8;
        *d.add(6) = (new_len >> 16) as u8;
        *d.add(7) = (new_len >> 24) as u8;
        *d.add(12) = sid as u8;
        *d.add(13) = (sid >> 8) as u8;
        *d.add(14) = (sid >> 16) as u8;
        *d.add(15) = (sid >> 24) as u8;
    }
    // The PUBs right behind it to the same route join this verdict.
    let (n, inp, out) = direct_run::<R>(
        ctx,
        route,
        hash,
        size,
        frame,
        msg_len as u32,
        read_volatile_u64(used),
        grant,
    );
    unsafe { bpf_msg_apply_bytes(ctx.msg, out) };
    let (n, inp, out) = (n as u64, inp as u64, out as u64);
    add(used, out);
    add(unsafe { addr_of!((*sub).msgs) } as *mut u64, n);
    add(unsafe { addr_of!((*st).direct_msgs) } as *mut u64, n);
    add(unsafe { addr_of!((*st).direct_bytes) } as *mut u64, out);
    add(unsafe { addr_of!((*st).direct_pub_bytes) } as *mut u64, inp);
    match DIRECT_SUBJECTS.get_ptr_mut(&hash) {
        Some(c) => {
            add(unsafe { addr_of!((*c).msgs) } as *mut u64, n);
            add(unsafe { addr_of!((*c).bytes) } as *mut u64, out);
        }
        None => {
            let v = MaybeUninit::<DirectCount>::uninit();
            let p = v.as_ptr() as *mut u64;
            unsafe {
                write_volatile(p, n);
                write_volatile(p.add(1), out);
            }
            let _ = DIRECT_SUBJECTS.insert(&hash, unsafe { &*v.as_ptr() }, 0);
        }
    }
    stat(|s| &s.direct_msgs, n);
    stat(|s| &s.direct_bytes, out);
    sk_action::SK_PASS
}

#[inline(always)]
fn read_volatile_u64(p: *const u64) -> u64 {
    unsafe { read_volatile(p) }
}

/// After the first frame of a send went direct (rewritten into `first_out`
/// MSG bytes from `first_in` PUB bytes): the PUB frames right behind it go
/// with it, in the same verdict, while each one passes every check the first
/// one did against the same route (header hash and then the subject bytes,
/// whole in this send, at most [`DIRECT_FRAME_MAX`], no reply subject and no
/// headers: a frame with either ends the run and gets the full check as the
/// first frame of the next run), the run's MSG bytes stay within
/// [`DIRECT_FRAME_MAX`] and within the subscriber's grant (`used` of
/// `grant`). The permission and the ordering barrier hold for the whole run:
/// same publisher, and nothing of the run goes to the broker. Each frame is
/// rewritten in place (its room, or 4 bytes pushed after its header, takes
/// the sid; frames with room and without never share a run). Returns
/// the frames, the PUB bytes and the MSG bytes of the run, first frame
/// included.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn direct_run<const R: usize>(
    ctx: &SkMsgContext,
    route: &DirectRoute,
    hash: u32,
    size: u32,
    first_in: u32,
    first_out: u32,
    used: u64,
    grant: u64,
) -> (u32, u32, u32) {
    let sid = route.sid;
    let mut n = 1u32;
    let mut inp = first_in;
    let mut out = first_out;
    // Each pushed sid costs scatterlist slots; room costs nothing.
    let most = if R == 0 {
        DIRECT_RUN_FRAMES
    } else {
        DIRECT_ROOM_RUN_FRAMES
    };
    while n < most {
        // A fresh load each time: the compare loop below pins the length it
        // ran to, and a length carried over would give the verifier one
        // state per length for every frame after.
        let slen = (unsafe { read_volatile(addr_of!(route.subject_len)) } & 0xff) as usize;
        if slen == 0 || slen > DIRECT_SUBJECT_MAX {
            break;
        }
        // Header, room, subject, empty reply subject, empty headers.
        let want = HEADER + R as u32 + 2 + slen as u32 + 2 + 4;
        if inp >= size || size - inp < want || out > DIRECT_FRAME_MAX {
            break;
        }
        // The window now starts at this frame.
        if unsafe { bpf_msg_pull_data(ctx.msg, out, out + want, 0) } != 0 {
            break;
        }
        // Only PUBs of the same kind (with or without room) join the run.
        let room = if R == 0 { 0 } else { PUB_ROOM as u32 };
        if byte(ctx, 0) != b'S' as u32
            || byte(ctx, 1) != b'B' as u32
            || byte(ctx, 2) != KIND_PUB as u32
            || byte(ctx, 3) & PUB_ROOM as u32 != room
        {
            break;
        }
        let (l0, l1) = (le16(ctx, 4), le16(ctx, 6));
        let (h0, h1) = (le16(ctx, 8), le16(ctx, 10));
        if l0 == OUT || l1 == OUT || h0 == OUT || h1 == OUT || (h0 | h1 << 16) != hash {
            break;
        }
        let len = l0 | l1 << 16;
        let frame = len.saturating_add(HEADER);
        if frame > DIRECT_FRAME_MAX || frame > size - inp {
            break;
        }
        let msg_len = frame + (ROOM - R) as u32;
        if out + msg_len > DIRECT_FRAME_MAX || used.saturating_add((out + msg_len) as u64) > grant {
            break;
        }
        if le16(ctx, 12 + R) as usize != slen {
            break;
        }
        let max_slot = DIRECT_SUBJECT_MAX;
        let max = unsafe { read_volatile(&max_slot) };
        let mut i = 0usize;
        let mut same = true;
        while i < slen {
            if i >= max {
                same = false;
                break;
            }
            let want_b = unsafe { *route.subject.as_ptr().add(i) } as u32;
            if byte(ctx, 14 + R + i) != want_b {
                same = false;
                break;
            }
            i += 1;
        }
        if !same {
            break;
        }
        // No reply subject, no headers (fresh offsets, see per_frame).
        let s2 = (unsafe { read_volatile(addr_of!(route.subject_len)) } & 0xff) as usize;
        if le16(ctx, 14 + R + s2) != 0 || le16(ctx, 16 + R + s2) != 0 || le16(ctx, 18 + R + s2) != 0
        {
            break;
        }
        if R != 0 {
            // In place: the sid into the room, then kind and flags; the
            // length stays.
            if ctx.data() + HEADER as usize + ROOM > ctx.data_end() {
                break;
            }
            let d = ctx.data() as *mut u8;
            unsafe {
                *d.add(2) = KIND_MSG;
                *d.add(3) = 0;
                *d.add(12) = sid as u8;
                *d.add(13) = (sid >> 8) as u8;
                *d.add(14) = (sid >> 16) as u8;
                *d.add(15) = (sid >> 24) as u8;
            }
            out += msg_len;
            inp += frame;
            n += 1;
            continue;
        }
        // PUB -> MSG: the sid goes into 4 pushed bytes (a slot of its own,
        // so the pull below copies nothing), then the header in place.
        if ctx.push_data(out + HEADER, 4, 0).is_err() {
            break;
        }
        if unsafe { bpf_msg_pull_data(ctx.msg, out + HEADER, out + HEADER + 4, 0) } != 0
            || ctx.data() + 4 > ctx.data_end()
        {
            // Undo: the frame stays the PUB it was, for the next run.
            let _ = ctx.pop_data(out + HEADER, 4, 0);
            break;
        }
        let d = ctx.data() as *mut u8;
        unsafe {
            *d = sid as u8;
            *d.add(1) = (sid >> 8) as u8;
            *d.add(2) = (sid >> 16) as u8;
            *d.add(3) = (sid >> 24) as u8;
        }
        if unsafe { bpf_msg_pull_data(ctx.msg, out, out + HEADER, 0) } != 0
            || ctx.data() + HEADER as usize > ctx.data_end()
        {
            let _ = ctx.pop_data(out + HEADER, 4, 0);
            break;
        }
        let d = ctx.data() as *mut u8;
        let new_len = len + 4;
        unsafe {
            *d.add(2) = KIND_MSG;
            *d.add(3) = 0;
            *d.add(4) = new_len as u8;
            *d.add(5) = (new_len >> 8) as u8;
            *d.add(6) = (new_len >> 16) as u8;
            *d.add(7) = (new_len >> 24) as u8;
        }
        out += msg_len;
        inp += frame;
        n += 1;
    }
    (n, inp, out)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
