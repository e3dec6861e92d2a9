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

use core::ptr::{addr_of, read_volatile};
use core::sync::atomic::{AtomicU64, Ordering};

use aya_ebpf::bindings::{bpf_sock_ops, sk_action, sk_msg_md, BPF_F_INGRESS};
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_msg_apply_bytes};
use aya_ebpf::macros::{map, sk_msg, sock_ops};
use aya_ebpf::maps::{HashMap, PerCpuArray, SockHash};
use aya_ebpf::programs::{SkMsgContext, SockOpsContext};
use aya_ebpf::EbpfContext;
use sockbus_accel_common::{
    SockKey, Stats, PORTS_MAX_ENTRIES, SOCKS_MAX_ENTRIES, STATS_INDEX, VERDICT_BYTES,
};

#[map(name = "SOCKBUS_SOCKS")]
static SOCKS: SockHash<SockKey> = SockHash::with_max_entries(SOCKS_MAX_ENTRIES, 0);

/// Ports (host byte order) whose connections are accelerated; filled by the
/// loader. 0 = every port.
#[map(name = "SOCKBUS_PORTS")]
static PORTS: HashMap<u32, u32> = HashMap::with_max_entries(PORTS_MAX_ENTRIES, 0);

#[map(name = "SOCKBUS_STATS")]
static STATS: PerCpuArray<Stats> = PerCpuArray::with_max_entries(1, 0);

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
        Err(_) => stat(|s| &s.add_failures, 1),
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
    let Some(key) = key else {
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
    // On a miss the helper answers SK_DROP, which would discard the data:
    // pass it to TCP instead.
    if SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == sk_action::SK_PASS as i64 {
        // The peer never changes: let this verdict stand for this message
        // and the next VERDICT_BYTES of the connection's sends (the kernel
        // redirects them without running this program; a miss is never
        // cached). Covering the whole message keeps a large send in one
        // piece.
        let grant = size.saturating_add(VERDICT_BYTES);
        unsafe { bpf_msg_apply_bytes(ctx.msg, grant) };
        stat(|s| &s.redirect_verdicts, 1);
        stat(|s| &s.bytes_redirected, grant as u64);
    } else {
        stat(|s| &s.misses, 1);
    }
    sk_action::SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
