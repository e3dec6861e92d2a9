// The contract between the BPF object and its loader: map and program
// names, and the `#[repr(C)]` layouts of map keys and values. Change both
// sides together (the loader embeds the object built from this file).

/// Program symbol names in the BPF object.
pub const PROG_SOCK_OPS: &str = "sockbus_sock_ops";
pub const PROG_SK_MSG: &str = "sockbus_sk_msg";

/// Map symbol names in the BPF object.
pub const MAP_SOCKS: &str = "SOCKBUS_SOCKS";
pub const MAP_PORTS: &str = "SOCKBUS_PORTS";
pub const MAP_STATS: &str = "SOCKBUS_STATS";

/// Default capacity of the socket hash (each accelerated connection holds two
/// entries, one per end). A full map makes the insert fail: that connection
/// stays on plain TCP and `add_failures` counts it.
pub const SOCKS_MAX_ENTRIES: u32 = 65_536;
/// Most ports the loader can configure. Port 0 in the set means every port
/// (only sensible at a dedicated cgroup).
pub const PORTS_MAX_ENTRIES: u32 = 64;

/// Key of the socket hash: one end of a TCP connection, seen from that end.
///
/// Addresses are IPv6, with IPv4 written as IPv4-mapped (`::ffff:a.b.c.d`)
/// so that an IPv4 socket and a dual-stack socket of the same connection
/// agree. Addresses are in network byte order as the kernel gives them,
/// ports in host byte order. `netns` is the network namespace cookie when the
/// local address is a loopback address (127.0.0.0/8, ::1), so that loopback
/// connections of different namespaces never collide, and 0 otherwise: the
/// peer of a pod-to-pod connection sits in another namespace whose cookie
/// the sender cannot know, and pod addresses are unique on a node anyway.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockKey {
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    pub local_port: u32,
    pub remote_port: u32,
    pub netns: u64,
}

/// Counters, one set per CPU (the loader sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Sockets put into the socket hash (two per accelerated connection).
    pub sockets_added: u64,
    /// Inserts the kernel refused (map full, socket busy in another map).
    pub add_failures: u64,
    /// Redirect verdicts: sends that ran the program and were redirected to
    /// the peer socket. Each verdict also covers the connection's following
    /// sends up to [`VERDICT_BYTES`] in all, which the kernel redirects
    /// without running the program again.
    pub redirect_verdicts: u64,
    /// Bytes the redirect verdicts cover, [`VERDICT_BYTES`] each: the bytes
    /// redirected, ahead of them by less than `VERDICT_BYTES` per connection
    /// (the part of its last verdict a connection has not used yet).
    pub bytes_redirected: u64,
    /// sendmsg calls on an accelerated socket whose peer was not in the map
    /// (it went over plain TCP).
    pub misses: u64,
}

/// How many bytes of a connection's sends one redirect verdict covers
/// (`bpf_msg_apply_bytes`). The peer of a connection never changes, so the
/// verdict is the same for every send; running the program for each one
/// costs about a microsecond of every request/reply round trip (the verdict
/// machinery takes and drops references on the peer socket, a cache line
/// the peer's CPU owns).
pub const VERDICT_BYTES: u32 = 64 * 1024;

/// Index of the single [`Stats`] entry in the per-CPU stats array.
pub const STATS_INDEX: u32 = 0;
