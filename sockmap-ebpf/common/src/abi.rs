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
    /// PUB frames delivered straight into a subscriber's socket as MSG.
    pub direct_msgs: u64,
    /// Bytes of those MSG frames.
    pub direct_bytes: u64,
    /// Frames of per-frame-mode publishers that went to the broker instead
    /// (several may share one verdict).
    pub direct_fallbacks: u64,
    /// Connections that lost frame alignment (a header split over sends).
    pub direct_broken: u64,
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

// ------------------------------------------------------------------
// Direct delivery (publisher socket -> subscriber socket, docs/fast-path.md,
// "Direct delivery"). Every map below is empty unless the loader enables
// direct delivery in `SOCKBUS_DIRECT_CONFIG`.

pub const MAP_DIRECT_CONFIG: &str = "SOCKBUS_DIRECT_CONFIG";
pub const MAP_DIRECT_PUBS: &str = "SOCKBUS_DIRECT_PUBS";
pub const MAP_DIRECT_ALLOW: &str = "SOCKBUS_DIRECT_ALLOW";
pub const MAP_DIRECT_DONE: &str = "SOCKBUS_DIRECT_DONE";
pub const MAP_DIRECT_ROUTES: &str = "SOCKBUS_DIRECT_ROUTES";
pub const MAP_DIRECT_GRANT: &str = "SOCKBUS_DIRECT_GRANT";
pub const MAP_DIRECT_SUBS: &str = "SOCKBUS_DIRECT_SUBS";
pub const MAP_DIRECT_SUBJECTS: &str = "SOCKBUS_DIRECT_SUBJECTS";

/// Index of the single `u32` in `SOCKBUS_DIRECT_CONFIG`: nonzero = the
/// broker may install direct routes, so `sockbus_sock_ops` puts every new
/// client-side socket of the broker's ports into per-frame mode.
pub const DIRECT_CONFIG_INDEX: u32 = 0;
/// Longest subject (and reply subject) a frame may carry to go direct; the
/// program compares the whole subject byte by byte.
pub const DIRECT_SUBJECT_MAX: usize = 128;
/// Largest PUB frame (header included) that may go direct: below this the
/// kernel keeps a frame of one sendmsg contiguous in the receiver's queue.
pub const DIRECT_FRAME_MAX: u32 = 64 * 1024;
/// Most PUB frames one direct verdict carries (rewritten into MSG frames in
/// one run of the program, redirected with one `bpf_msg_apply_bytes`). Each
/// rewritten frame takes two of a message's 17 scatterlist slots (the pushed
/// sid and the split after it); past that the kernel copies a whole slot per
/// push, so a run stops well before.
pub const DIRECT_RUN_FRAMES: u32 = 6;
/// Most PUB frames with room for the sid (PUB flag `PUB_ROOM`) one direct
/// verdict carries: each is rewritten in place, taking no slot, so a run is
/// bounded by [`DIRECT_FRAME_MAX`] bytes, the subscriber's grant, and this.
/// The verifier walks every iteration of the run and of its subject
/// comparison, keeping each exit pending: 32 frames exceed its limit of
/// 8,192 pending branches (measured on Linux 6.18).
pub const DIRECT_ROOM_RUN_FRAMES: u32 = 24;
/// Most frames one verdict to the broker carries in per-frame mode (the
/// frames whose headers lie in the message's first scatterlist element).
pub const BROKER_RUN_FRAMES: u32 = 256;
/// Capacity of each direct-delivery map.
pub const DIRECT_MAX_ENTRIES: u32 = 16_384;
/// `DirectPub::flags` bit set by the kernel: a frame header was split over
/// two sends (or was not a sockbus header); frame alignment is lost, so the
/// connection never goes direct again.
pub const DIRECT_PUB_BROKEN: u32 = 1;

/// Per-publisher state, keyed by the publisher's own socket (client end);
/// created by `sockbus_sock_ops` when the connection is established, written
/// only by the kernel afterwards (the broker reads it and deletes it when the
/// connection ends).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectPub {
    pub flags: u32,
    pub _pad: u32,
    /// Bytes of this connection's sends the program handed to the broker
    /// (every frame that did not go direct), since the connection began.
    pub passed: u64,
    pub direct_msgs: u64,
    pub direct_bytes: u64,
    /// Frames that were eligible to look up a route but went to the broker
    /// (no route, subject differs, not allowed, barrier, budget, size).
    pub fallbacks: u64,
    /// PUB bytes of the frames that went direct, as the publisher sent them
    /// (a PUB with room is as long as its MSG, one without is 4 shorter):
    /// what the broker credits the publisher for.
    pub direct_pub_bytes: u64,
}

/// A kernel route: subject (by hash, then compared byte by byte) -> the
/// subscriber's own socket (client end) and its subscription id. Written by
/// the broker only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectRoute {
    pub sub: SockKey,
    pub sid: u32,
    pub subject_len: u32,
    pub subject: [u8; DIRECT_SUBJECT_MAX],
}

/// Per-subscriber counters, keyed by the subscriber's socket; the kernel
/// creates and updates them, the broker reads and deletes them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectSub {
    /// MSG bytes delivered directly, ever; may not exceed the broker's grant
    /// (`SOCKBUS_DIRECT_GRANT`) for this socket.
    pub used: u64,
    pub msgs: u64,
}

/// Per-subject counters (by subject hash), kernel-owned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectCount {
    pub msgs: u64,
    pub bytes: u64,
}
