//! Direct delivery maps (docs/fast-path.md, "Direct delivery"): what the
//! broker tells the kernel so that a PUB frame of a same-node publisher goes
//! straight into its only subscriber's socket as a MSG frame.
//!
//! The kernel side (`sockbus_sk_msg`) sends a frame direct only when every
//! one of these holds, and to the broker otherwise:
//! - the publisher's socket is in per-frame mode (`SOCKBUS_DIRECT_PUBS`,
//!   entered when the connection is established while direct delivery is on)
//!   and has never had a header split across sends;
//! - a route exists for the frame's subject hash and the subject bytes equal
//!   the route's;
//! - the broker allowed this publisher ([`DirectMaps::allow`]);
//! - the broker has handled every byte this publisher sent it before
//!   ([`DirectMaps::set_done`] equals the kernel's `passed`): the barrier
//!   that keeps messages in order when a route is added;
//! - the subscriber's budget ([`DirectMaps::grant`]) covers the MSG frame;
//! - the frame is whole in this send, below [`DIRECT_FRAME_MAX`], with a
//!   plain reply subject and no headers.
//!
//! Several frames share one verdict: the PUBs right behind a direct one that
//! pass the same checks (up to `DIRECT_RUN_FRAMES`, at most
//! [`DIRECT_FRAME_MAX`] of MSG bytes in all), and the frames after one that
//! goes to the broker (up to `BROKER_RUN_FRAMES`).

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use aya::maps::{Array, HashMap, Map, MapData};

use super::abi::{
    self, DirectCount, DirectPub, DirectRoute, DirectSub, SockKey, DIRECT_CONFIG_INDEX,
    DIRECT_SUBJECT_MAX,
};

pub use super::abi::DIRECT_FRAME_MAX;

/// Owned handles on the direct-delivery maps of one loaded fast path.
pub struct DirectMaps {
    config: Array<MapData, u32>,
    pubs: HashMap<MapData, SockKey, DirectPub>,
    allow: HashMap<MapData, SockKey, u32>,
    done: HashMap<MapData, SockKey, u64>,
    routes: HashMap<MapData, u32, DirectRoute>,
    grant: HashMap<MapData, SockKey, u64>,
    subs: HashMap<MapData, SockKey, DirectSub>,
    subjects: HashMap<MapData, u32, DirectCount>,
}

fn err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn owned(m: &Map) -> io::Result<OwnedFd> {
    let d = match m {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::Array(d) => d,
        _ => return Err(io::Error::other("unexpected map type")),
    };
    d.fd().as_fd().try_clone_to_owned()
}

fn hash<K: aya::Pod, V: aya::Pod>(
    bpf: &aya::Ebpf,
    name: &str,
) -> io::Result<HashMap<MapData, K, V>> {
    let m = bpf
        .map(name)
        .ok_or_else(|| io::Error::other(format!("object has no map {name}")))?;
    let lru = matches!(m, Map::LruHashMap(_));
    let d = MapData::from_fd(owned(m)?).map_err(err)?;
    let m = if lru {
        Map::LruHashMap(d)
    } else {
        Map::HashMap(d)
    };
    HashMap::try_from(m).map_err(err)
}

impl DirectMaps {
    pub(crate) fn open(bpf: &aya::Ebpf) -> io::Result<DirectMaps> {
        let m = bpf
            .map(abi::MAP_DIRECT_CONFIG)
            .ok_or_else(|| io::Error::other("object has no direct config map"))?;
        let config =
            Array::try_from(Map::Array(MapData::from_fd(owned(m)?).map_err(err)?)).map_err(err)?;
        Ok(DirectMaps {
            config,
            pubs: hash(bpf, abi::MAP_DIRECT_PUBS)?,
            allow: hash(bpf, abi::MAP_DIRECT_ALLOW)?,
            done: hash(bpf, abi::MAP_DIRECT_DONE)?,
            routes: hash(bpf, abi::MAP_DIRECT_ROUTES)?,
            grant: hash(bpf, abi::MAP_DIRECT_GRANT)?,
            subs: hash(bpf, abi::MAP_DIRECT_SUBS)?,
            subjects: hash(bpf, abi::MAP_DIRECT_SUBJECTS)?,
        })
    }

    /// Turns per-frame mode on for connections established from now on.
    pub fn set_enabled(&mut self, on: bool) -> io::Result<()> {
        self.config
            .set(DIRECT_CONFIG_INDEX, u32::from(on), 0)
            .map_err(err)
    }

    /// Puts a publisher socket in per-frame mode. Only correct before its
    /// first byte (`sockbus_sock_ops` does it at establishment); for tests
    /// that build connections by hand.
    pub fn track_publisher(&mut self, publisher: SockKey) -> io::Result<()> {
        self.pubs
            .insert(publisher, DirectPub::default(), 0)
            .map_err(err)
    }

    pub fn publisher(&self, publisher: &SockKey) -> Option<DirectPub> {
        self.pubs.get(publisher, 0).ok()
    }

    /// Lets `publisher` go direct (the broker calls it only for publishers
    /// with no publish restrictions).
    pub fn allow(&mut self, publisher: SockKey) -> io::Result<()> {
        self.allow.insert(publisher, 1, 0).map_err(err)
    }

    pub fn disallow(&mut self, publisher: &SockKey) {
        let _ = self.allow.remove(publisher);
    }

    /// Bytes of `publisher`'s sends the broker has read, handled, and whose
    /// messages it has written to the kernel.
    pub fn set_done(&mut self, publisher: SockKey, bytes: u64) -> io::Result<()> {
        self.done.insert(publisher, bytes, 0).map_err(err)
    }

    /// Installs (or replaces) the route for `subject`: PUBs on it go to the
    /// socket `sub` as MSGs for subscription `sid`. Subjects longer than
    /// [`DIRECT_SUBJECT_MAX`] bytes cannot go direct.
    pub fn add_route(&mut self, subject: &str, sub: SockKey, sid: u32) -> io::Result<()> {
        let b = subject.as_bytes();
        if b.is_empty() || b.len() > DIRECT_SUBJECT_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "subject of {} bytes: direct routes take 1 to {DIRECT_SUBJECT_MAX}",
                    b.len()
                ),
            ));
        }
        let mut route = DirectRoute {
            sub,
            sid,
            subject_len: b.len() as u32,
            subject: [0; DIRECT_SUBJECT_MAX],
        };
        route.subject[..b.len()].copy_from_slice(b);
        self.add_route_hashed(sockbus_protocol::subject::subject_hash(b), route)
    }

    /// [`add_route`](Self::add_route) under a hash of the caller's choice
    /// (tests of colliding hashes).
    pub fn add_route_hashed(&mut self, hash: u32, route: DirectRoute) -> io::Result<()> {
        self.routes.insert(hash, route, 0).map_err(err)
    }

    pub fn remove_route(&mut self, subject: &str) {
        let _ = self
            .routes
            .remove(&sockbus_protocol::subject::subject_hash(subject.as_bytes()));
    }

    /// MSG bytes the subscriber socket `sub` may be sent directly, in all
    /// (a running total the broker only raises).
    pub fn grant(&mut self, sub: SockKey, total: u64) -> io::Result<()> {
        self.grant.insert(sub, total, 0).map_err(err)
    }

    pub fn subscriber(&self, sub: &SockKey) -> Option<DirectSub> {
        self.subs.get(sub, 0).ok()
    }

    pub fn subject(&self, subject: &str) -> Option<DirectCount> {
        self.subjects
            .get(
                &sockbus_protocol::subject::subject_hash(subject.as_bytes()),
                0,
            )
            .ok()
    }

    /// Forgets every entry of a socket that ended.
    pub fn forget(&mut self, key: &SockKey) {
        let _ = self.pubs.remove(key);
        let _ = self.allow.remove(key);
        let _ = self.done.remove(key);
        let _ = self.grant.remove(key);
        let _ = self.subs.remove(key);
    }
}

/// The keys of both ends of the TCP connection `fd` belongs to (this end,
/// the peer's end), as the programs compute them.
pub fn socket_keys(fd: &impl AsFd) -> io::Result<(SockKey, SockKey)> {
    super::sock::keys(fd)
}
