//! The harness's own network: one namespace per broker plus a hub namespace
//! holding a bridge, veth pairs between them, addresses 10.77.0.N inside
//! (the host's interfaces are never touched), and nftables rules in the
//! node namespaces for partitions. Brokers run inside their namespaces.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const CLIENT_PORT: u16 = 4222;
pub const ROUTE_PORT: u16 = 6222;
const HUB_IP: &str = "10.77.0.254";

/// Runs a command, failing with its stderr.
pub fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn in_ns(ns: &str, args: &[&str]) -> Result<()> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v)
}

/// Why this machine cannot run the harness, if it cannot.
pub fn missing_capability() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (ip netns, nftables)".into());
    }
    for tool in ["ip", "nft"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Some(format!(
                "`{tool}` not found (Debian packages iproute2 and nftables)"
            ));
        }
    }
    None
}

/// The namespaces of one harness process; deleted on drop.
pub struct Net {
    pub hub: String,
    pub nodes: Vec<String>,
}

impl Net {
    pub fn ip(i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// Creates the hub and `n` node namespaces, wired to the hub's bridge.
    pub fn create(n: usize) -> Result<Net> {
        let prefix = format!("sbf{}", std::process::id());
        let net = Net {
            hub: format!("{prefix}-hub"),
            nodes: (0..n).map(|i| format!("{prefix}-n{}", i + 1)).collect(),
        };
        sh(&["ip", "netns", "add", &net.hub])?;
        for ns in &net.nodes {
            sh(&["ip", "netns", "add", ns])?;
        }
        in_ns(&net.hub, &["ip", "link", "set", "lo", "up"])?;
        in_ns(&net.hub, &["ip", "link", "add", "br0", "type", "bridge"])?;
        in_ns(
            &net.hub,
            &["ip", "addr", "add", &format!("{HUB_IP}/24"), "dev", "br0"],
        )?;
        in_ns(&net.hub, &["ip", "link", "set", "br0", "up"])?;
        for (i, ns) in net.nodes.iter().enumerate() {
            let v = format!("v{}", i + 1);
            in_ns(
                &net.hub,
                &[
                    "ip", "link", "add", &v, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ],
            )?;
            in_ns(&net.hub, &["ip", "link", "set", &v, "master", "br0"])?;
            in_ns(&net.hub, &["ip", "link", "set", &v, "up"])?;
            in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
            in_ns(
                ns,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", Net::ip(i)),
                    "dev",
                    "eth0",
                ],
            )?;
            in_ns(ns, &["ip", "link", "set", "eth0", "up"])?;
            in_ns(ns, &["nft", "add", "table", "inet", "sbf"])?;
            in_ns(
                ns,
                &[
                    "nft",
                    "add chain inet sbf in { type filter hook input priority 0; policy accept; }",
                ],
            )?;
            in_ns(
                ns,
                &[
                    "nft",
                    "add chain inet sbf out { type filter hook output priority 0; policy accept; }",
                ],
            )?;
        }
        Ok(net)
    }

    /// Moves the calling thread (call before any other thread starts) into
    /// the hub namespace, where the clients run and every node is reachable.
    pub fn enter_hub(&self) -> Result<()> {
        let f = File::open(format!("/var/run/netns/{}", self.hub))
            .context("cannot open the hub namespace")?;
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Drops all traffic between node `a` and node `b` (both directions, rules on both sides).
    pub fn block(&self, a: usize, b: usize) -> Result<()> {
        for (x, y) in [(a, b), (b, a)] {
            let peer = Net::ip(y);
            in_ns(
                &self.nodes[x],
                &["nft", &format!("add rule inet sbf in ip saddr {peer} drop")],
            )?;
            in_ns(
                &self.nodes[x],
                &[
                    "nft",
                    &format!("add rule inet sbf out ip daddr {peer} drop"),
                ],
            )?;
        }
        Ok(())
    }

    /// Removes every partition rule.
    pub fn heal(&self) -> Result<()> {
        for ns in &self.nodes {
            in_ns(ns, &["nft", "flush", "table", "inet", "sbf"])?;
        }
        Ok(())
    }

    pub fn link(&self, i: usize, up: bool) -> Result<()> {
        in_ns(
            &self.nodes[i],
            &["ip", "link", "set", "eth0", if up { "up" } else { "down" }],
        )
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain([&self.hub]) {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

/// One broker: its namespace, data dir, log and process (if running).
pub struct Node {
    pub idx: usize,
    pub ns: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub paused: bool,
    pub starts: u32,
}

impl Node {
    pub fn name(&self) -> String {
        format!("n{}", self.idx + 1)
    }
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn url(&self) -> String {
        format!("sockbus://{}:{CLIENT_PORT}", Net::ip(self.idx))
    }

    pub fn start(&mut self, broker: &Path, peers: &str) -> Result<()> {
        std::fs::create_dir_all(self.data())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))?;
        let ip = Net::ip(self.idx);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(broker)
            .args(["--listen", &format!("{ip}:{CLIENT_PORT}")])
            .args(["--cluster", &format!("{ip}:{ROUTE_PORT}")])
            .args(["--peers", peers])
            .args(["--node-id", &self.name()])
            .arg("--data-dir")
            .arg(self.data())
            .args(["--drain-timeout", "2s", "--lame-duck-grace", "0"])
            // Only the harness's own namespaces can reach these addresses.
            .arg("--allow-anonymous")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // The broker dies with the harness, whatever kills it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().context("cannot start the broker")?);
        self.paused = false;
        self.starts += 1;
        Ok(())
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn signal(&mut self, sig: i32) {
        if let Some(pid) = self.pid() {
            unsafe { libc::kill(pid, sig) };
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if self.paused {
            self.signal(libc::SIGCONT);
        }
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + grace;
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process died on its own (a crash, not one of our faults).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}
