//! Loads the BPF object, attaches it, reads its counters, detaches it.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuValues, SockHash};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};

use super::abi::{self, SockKey, Stats};
use super::cgroup;

/// The BPF object built by `sockmap-ebpf/build.sh` (checked by `check.sh`).
static OBJECT: &[u8] = aya::include_bytes_aligned!("sockbus.bpf.o");

/// Where and what to accelerate.
#[derive(Debug, Clone, Default)]
pub struct AttachOptions {
    /// Connections whose local or remote port is one of these are accelerated.
    pub ports: Vec<u16>,
    /// cgroup v2 directory to attach at: absolute, or relative to the
    /// cgroup v2 root; `None` = the root (every process on the host).
    pub cgroup: Option<PathBuf>,
    /// Capacity of the socket hash (default [`abi::SOCKS_MAX_ENTRIES`]).
    pub max_sockets: Option<u32>,
}

/// Why the fast path could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no ports to accelerate")]
    NoPorts,
    #[error("at most {max} ports can be accelerated, got {got}")]
    TooManyPorts { got: usize, max: u32 },
    #[error("not permitted to load BPF programs (needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON): {0}")]
    Permission(String),
    #[error("the kernel refused the BPF programs: {0}")]
    Kernel(String),
    #[error("cgroup v2 is not mounted and mounting it at {path} failed: {err}")]
    MountCgroup { path: String, err: io::Error },
    #[error("cannot open cgroup {path}: {err}")]
    OpenCgroup { path: PathBuf, err: io::Error },
    /// Attached, but the programs did not carry a test connection correctly
    /// (see `selftest`); detached again.
    #[error("self-test failed: check {check}: {detail}")]
    SelfTest { check: &'static str, detail: String },
}

fn classify(what: &str, e: impl std::error::Error) -> AttachError {
    // aya nests the errno a few sources deep; EPERM anywhere means privileges.
    let mut text = format!("{what}: {e}");
    let mut src = e.source();
    let mut eperm = false;
    while let Some(s) = src {
        // aya repeats a source's text in its own message; say it once.
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        if let Some(io) = s.downcast_ref::<io::Error>() {
            eperm |= matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES));
        }
        src = s.source();
    }
    if eperm {
        AttachError::Permission(text)
    } else {
        AttachError::Kernel(text)
    }
}

/// The attached programs. Dropping it detaches them.
pub struct FastPath {
    bpf: Ebpf,
    stats: PerCpuArray<MapData, Stats>,
    /// The stats map again, for handles of their own ([`FastPath::handles`]).
    stats_fd: OwnedFd,
    cgroup: PathBuf,
    cgroup_mounted: bool,
    ports: Vec<u16>,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("cgroup", &self.cgroup)
            .field("ports", &self.ports)
            .finish()
    }
}

impl FastPath {
    /// Loads the programs, fills the port set, attaches sk_msg to the socket
    /// hash and sock_ops to the cgroup (as a BPF link, which coexists with
    /// other programs at that cgroup or below).
    pub fn attach(opts: &AttachOptions) -> Result<FastPath, AttachError> {
        let mut ports = opts.ports.clone();
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() {
            return Err(AttachError::NoPorts);
        }
        if ports.len() > abi::PORTS_MAX_ENTRIES as usize {
            return Err(AttachError::TooManyPorts {
                got: ports.len(),
                max: abi::PORTS_MAX_ENTRIES,
            });
        }
        let mut loader = EbpfLoader::new();
        if let Some(n) = opts.max_sockets {
            loader.map_max_entries(abi::MAP_SOCKS, n);
        }
        let mut bpf = loader.load(OBJECT).map_err(|e| classify("load", e))?;

        {
            let map = bpf
                .map_mut(abi::MAP_PORTS)
                .ok_or_else(|| AttachError::Kernel("object has no port map".into()))?;
            let mut map: HashMap<_, u32, u32> =
                HashMap::try_from(map).map_err(|e| classify("port map", e))?;
            for p in &ports {
                map.insert(u32::from(*p), 1, 0)
                    .map_err(|e| classify("port map", e))?;
            }
        }

        // sk_msg first: a socket takes the map's programs when it is inserted.
        let socks_fd = {
            let map = bpf
                .map(abi::MAP_SOCKS)
                .ok_or_else(|| AttachError::Kernel("object has no socket map".into()))?;
            let socks: SockHash<_, SockKey> =
                SockHash::try_from(map).map_err(|e| classify("socket map", e))?;
            socks
                .fd()
                .try_clone()
                .map_err(|e| classify("socket map", e))?
        };
        let msg: &mut SkMsg = bpf
            .program_mut(abi::PROG_SK_MSG)
            .ok_or_else(|| AttachError::Kernel("object has no sk_msg program".into()))?
            .try_into()
            .map_err(|e| classify("sk_msg", e))?;
        msg.load().map_err(|e| classify("load sk_msg", e))?;
        msg.attach(&socks_fd)
            .map_err(|e| classify("attach sk_msg", e))?;

        let ops: &mut SockOps = bpf
            .program_mut(abi::PROG_SOCK_OPS)
            .ok_or_else(|| AttachError::Kernel("object has no sock_ops program".into()))?
            .try_into()
            .map_err(|e| classify("sock_ops", e))?;
        ops.load().map_err(|e| classify("load sock_ops", e))?;

        // Only now that we know we may load programs: find or mount cgroup v2.
        let cg = cgroup::find_or_mount().map_err(|err| AttachError::MountCgroup {
            path: cgroup::FALLBACK_MOUNT.into(),
            err,
        })?;
        let path = cgroup::resolve(&cg.root, opts.cgroup.as_deref());
        let dir = File::open(&path).map_err(|err| AttachError::OpenCgroup {
            path: path.clone(),
            err,
        })?;
        // On the kernels we support (>= 5.15) aya attaches with a BPF link,
        // which the kernel always treats as multi-attach (BPF_F_ALLOW_MULTI):
        // other sock_ops programs at this cgroup or below (Cilium, another
        // sockbus) keep running. A link takes no flags ("Single" = 0); passing
        // AllowMultiple to bpf_link_create is refused with EINVAL.
        ops.attach(dir, CgroupAttachMode::Single)
            .map_err(|e| classify(&format!("attach sock_ops at {}", path.display()), e))?;

        let stats_fd = bpf
            .map(abi::MAP_STATS)
            .map(|m| match m {
                Map::PerCpuArray(d) => d.fd().as_fd().try_clone_to_owned(),
                _ => Err(io::Error::other("stats map is not a per-CPU array")),
            })
            .ok_or_else(|| AttachError::Kernel("object has no stats map".into()))?
            .map_err(|e| classify("stats map", e))?;
        let stats = bpf
            .take_map(abi::MAP_STATS)
            .ok_or_else(|| AttachError::Kernel("object has no stats map".into()))?;
        let stats = PerCpuArray::try_from(stats).map_err(|e| classify("stats map", e))?;
        Ok(FastPath {
            bpf,
            stats,
            stats_fd,
            cgroup: path,
            cgroup_mounted: cg.mounted_here,
            ports,
        })
    }

    /// Handles on the direct-delivery maps (see [`super::direct`]).
    pub fn direct(&self) -> io::Result<super::direct::DirectMaps> {
        super::direct::DirectMaps::open(&self.bpf)
    }

    /// Counters summed over every CPU.
    pub fn stats(&self) -> io::Result<Stats> {
        let per_cpu = self
            .stats
            .get(&abi::STATS_INDEX, 0)
            .map_err(io::Error::other)?;
        Ok(sum(&per_cpu))
    }

    /// The socket hash and the counters through file descriptors of their
    /// own, for a thread that must not borrow `self` (the self-test).
    pub(crate) fn handles(&self) -> io::Result<Handles> {
        let socks = self
            .bpf
            .map(abi::MAP_SOCKS)
            .ok_or_else(|| io::Error::other("object has no socket map"))?;
        let Map::SockHash(socks) = socks else {
            return Err(io::Error::other("socket map is not a sockhash"));
        };
        let socks =
            MapData::from_fd(socks.fd().as_fd().try_clone_to_owned()?).map_err(io::Error::other)?;
        let socks = SockHash::try_from(Map::SockHash(socks)).map_err(io::Error::other)?;
        let stats = MapData::from_fd(self.stats_fd.try_clone()?).map_err(io::Error::other)?;
        let stats = PerCpuArray::try_from(Map::PerCpuArray(stats)).map_err(io::Error::other)?;
        Ok(Handles { socks, stats })
    }

    /// Which of `keys` are in the socket hash now (one walk of the map).
    pub(crate) fn contains(&self, keys: &[SockKey]) -> io::Result<Vec<bool>> {
        let map = self
            .bpf
            .map(abi::MAP_SOCKS)
            .ok_or_else(|| io::Error::other("object has no socket map"))?;
        let socks = SockHash::<_, SockKey>::try_from(map).map_err(io::Error::other)?;
        contains(socks.keys(), keys)
    }

    /// True when `key` is in the socket hash now.
    pub fn contains_key(&self, key: &SockKey) -> bool {
        self.contains(std::slice::from_ref(key))
            .map(|v| v[0])
            .unwrap_or(false)
    }

    /// Sockets currently in the socket hash (two per accelerated connection).
    pub fn sockets(&self) -> usize {
        let Some(map) = self.bpf.map(abi::MAP_SOCKS) else {
            return 0;
        };
        let Ok(socks) = SockHash::<_, SockKey>::try_from(map) else {
            return 0;
        };
        socks.keys().filter(Result::is_ok).count()
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// True when cgroup v2 was not mounted and this process mounted it.
    pub fn mounted_cgroup(&self) -> bool {
        self.cgroup_mounted
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Detaches both programs now (dropping does the same).
    pub fn detach(self) {
        drop(self)
    }
}

/// Owned handles on a fast path's maps (see [`FastPath::handles`]).
pub(crate) struct Handles {
    pub socks: SockHash<MapData, SockKey>,
    pub stats: PerCpuArray<MapData, Stats>,
}

impl Handles {
    pub fn stats(&self) -> io::Result<Stats> {
        let per_cpu = self
            .stats
            .get(&abi::STATS_INDEX, 0)
            .map_err(io::Error::other)?;
        Ok(sum(&per_cpu))
    }

    pub fn contains(&self, keys: &[SockKey]) -> io::Result<Vec<bool>> {
        contains(self.socks.keys(), keys)
    }
}

fn contains(
    in_map: impl Iterator<Item = Result<SockKey, aya::maps::MapError>>,
    keys: &[SockKey],
) -> io::Result<Vec<bool>> {
    let mut found = vec![false; keys.len()];
    for k in in_map {
        // A key deleted while the walk passes it ends the walk early
        // (ENOENT from the kernel's next-key); what was seen so far stands.
        let Ok(k) = k else { break };
        for (i, want) in keys.iter().enumerate() {
            found[i] |= k == *want;
        }
    }
    Ok(found)
}

fn sum(per_cpu: &PerCpuValues<Stats>) -> Stats {
    let mut s = Stats::default();
    for c in per_cpu.iter() {
        s.sockets_added += c.sockets_added;
        s.add_failures += c.add_failures;
        s.redirect_verdicts += c.redirect_verdicts;
        s.bytes_redirected += c.bytes_redirected;
        s.misses += c.misses;
        s.direct_msgs += c.direct_msgs;
        s.direct_bytes += c.direct_bytes;
        s.direct_fallbacks += c.direct_fallbacks;
        s.direct_broken += c.direct_broken;
    }
    s
}

impl Drop for FastPath {
    fn drop(&mut self) {
        // Links and attachments are released with the programs; do it
        // explicitly so a leaked `Ebpf` could never keep them attached.
        for (_, prog) in self.bpf.programs_mut() {
            match prog {
                aya::programs::Program::SockOps(p) => {
                    let _ = p.unload();
                }
                aya::programs::Program::SkMsg(p) => {
                    let _ = p.unload();
                }
                _ => {}
            }
        }
    }
}
