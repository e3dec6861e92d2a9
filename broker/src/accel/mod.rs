//! The same-node fast path: eBPF sock_ops + sk_msg programs (built from
//! `sockmap-ebpf/`) that move the bytes of a connection between a client
//! and the broker socket to socket inside the kernel, skipping TCP/IP.
//! The broker still does all routing; the protocol's flow control bounds
//! what the kernel queues (it ignores the receiver's socket buffer on this
//! path). See docs/fast-path.md.
//!
//! `--accel on` attaches or fails; `auto` attaches when it can and otherwise
//! says why in one log line and serves plain TCP; `off` never tries. The
//! `sockbus-broker accel agent` command attaches for a whole node so brokers
//! can run unprivileged. Either way the fast path is used only after it has
//! passed a self-test on this kernel (`selftest`), and while the broker
//! runs, a stall guard (`guard`) closes fast-path connections whose socket
//! stops taking bytes.

pub mod abi;
pub mod agent;
pub mod cgroup;
pub mod direct;
pub mod guard;
mod loader;
pub(crate) mod routes;
pub mod selftest;
mod sock;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

pub use abi::Stats;
pub use loader::{AttachError, AttachOptions, FastPath};

use crate::config::AccelMode;

/// What the fast path is doing in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelState {
    /// Programs attached; connections on the configured ports are accelerated.
    Active,
    /// `--accel auto` could not attach; plain TCP.
    Fallback,
    /// `--accel off`, or detached at shutdown.
    Off,
}

impl AccelState {
    pub fn as_str(self) -> &'static str {
        match self {
            AccelState::Active => "active",
            AccelState::Fallback => "fallback",
            AccelState::Off => "off",
        }
    }
}

/// A snapshot for `/metrics` and the status page.
#[derive(Debug, Clone)]
pub struct AccelStatus {
    pub state: AccelState,
    /// Why: "attached at /sys/fs/cgroup for ports 7420", the fallback reason, ...
    pub reason: String,
    /// Counters of the kernel programs (zero unless active).
    pub stats: Stats,
    /// Sockets currently in the socket hash.
    pub sockets: usize,
    /// Direct delivery (`--accel-direct`): on only while the fast path is
    /// active, was wanted, and passed the `direct` self-test check.
    pub direct: bool,
    /// Why direct delivery is on or off.
    pub direct_reason: String,
}

struct Global {
    state: AccelState,
    reason: String,
    path: Option<Arc<FastPath>>,
    direct: bool,
    direct_reason: String,
}

static GLOBAL: Mutex<Global> = Mutex::new(Global {
    state: AccelState::Off,
    reason: String::new(),
    path: None,
    direct: false,
    direct_reason: String::new(),
});

fn global() -> std::sync::MutexGuard<'static, Global> {
    GLOBAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn set(state: AccelState, reason: String, path: Option<Arc<FastPath>>) {
    let mut g = global();
    g.state = state;
    g.reason = reason;
    g.path = path;
    g.direct = false;
    g.direct_reason = "the fast path is not active".into();
}

fn set_direct(on: bool, reason: String) {
    let mut g = global();
    g.direct = on;
    g.direct_reason = reason;
}

/// The value of a test hook's variable (`SOCKBUS_ACCEL_SELFTEST_FAIL`,
/// `SOCKBUS_ACCEL_STALL_INJECT`), which injects a failure on purpose.
/// Hooks exist only in builds with debug assertions (what `cargo test`
/// builds): a release build ignores the variable and says so, so a stray
/// variable cannot switch the fast path off or close connections in
/// production. A hook in use is logged at WARN.
pub(crate) fn test_hook(var: &str) -> Option<String> {
    let v = std::env::var(var).ok().filter(|v| !v.is_empty())?;
    if cfg!(debug_assertions) {
        tracing::warn!(
            "test hook {var}={v} is set: a failure is injected on purpose (debug build)"
        );
        Some(v)
    } else {
        tracing::warn!("{var} is set and ignored: test hooks exist only in debug builds");
        None
    }
}

/// The attached fast path, when there is one.
fn active_path() -> Option<Arc<FastPath>> {
    global().path.clone()
}

/// The fast path's state in this process (broker or agent).
pub fn status() -> AccelStatus {
    let (state, reason, path, direct, direct_reason) = {
        let g = global();
        (
            g.state,
            g.reason.clone(),
            g.path.clone(),
            g.direct,
            g.direct_reason.clone(),
        )
    };
    let (stats, sockets) = match &path {
        Some(p) => (p.stats().unwrap_or_default(), p.sockets()),
        None => (Stats::default(), 0),
    };
    AccelStatus {
        state,
        reason: if reason.is_empty() {
            "not started".into()
        } else {
            reason
        },
        stats,
        sockets,
        direct,
        direct_reason,
    }
}

/// Appends the fast path's metrics in Prometheus text format.
pub fn render_prometheus(out: &mut String) {
    let s = status();
    let _ = writeln!(
        out,
        "# HELP sockbus_accel_active 1 when the eBPF fast path is attached.\n\
         # TYPE sockbus_accel_active gauge\n\
         sockbus_accel_active {}",
        u8::from(s.state == AccelState::Active)
    );
    let _ = writeln!(
        out,
        "# HELP sockbus_accel_state Fast path state (active, fallback, off).\n\
         # TYPE sockbus_accel_state gauge"
    );
    for st in [AccelState::Active, AccelState::Fallback, AccelState::Off] {
        let _ = writeln!(
            out,
            "sockbus_accel_state{{state=\"{}\"}} {}",
            st.as_str(),
            u8::from(st == s.state)
        );
    }
    let _ = writeln!(
        out,
        "# HELP sockbus_accel_direct_active 1 when direct delivery (--accel-direct) is on.\n\
         # TYPE sockbus_accel_direct_active gauge\n\
         sockbus_accel_direct_active {}",
        u8::from(s.direct)
    );
    let _ = writeln!(
        out,
        "# HELP sockbus_accel_sockets Sockets in the fast path's socket hash (two per connection).\n\
         # TYPE sockbus_accel_sockets gauge\n\
         sockbus_accel_sockets {}",
        s.sockets
    );
    let counters = [
        ("sockets_added_total", "Sockets put into the socket hash.", s.stats.sockets_added),
        ("add_failures_total", "Socket inserts the kernel refused (map full, socket busy); those connections use plain TCP.", s.stats.add_failures),
        ("redirect_verdicts_total", "Redirect verdicts: sends that ran the sk_msg program and went socket to socket; each covers the connection's next 64 KiB of sends.", s.stats.redirect_verdicts),
        ("bytes_redirected_total", "Bytes covered by redirect verdicts (64 KiB each): bytes sent socket to socket, ahead by less than 64 KiB per connection.", s.stats.bytes_redirected),
        ("misses_total", "sendmsg calls on an accelerated socket whose peer was not in the map (sent over TCP).", s.stats.misses),
        ("direct_messages_total", "PUB frames the kernel delivered straight into their subscriber's socket as MSG (direct delivery).", s.stats.direct_msgs),
        ("direct_bytes_total", "Bytes of the MSG frames delivered directly.", s.stats.direct_bytes),
        ("direct_fallbacks_total", "Frames of per-frame-mode publishers that went to the broker instead of direct.", s.stats.direct_fallbacks),
        ("direct_unaligned_total", "Publisher connections that lost frame alignment (a header split over sends) and go through the broker for good.", s.stats.direct_broken),
        ("stalls_total", "Fast-path connections the stall guard closed: their socket took none of a batch of bytes for --accel-stall-timeout.", guard::stalls()),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP sockbus_accel_{name} {help}\n# TYPE sockbus_accel_{name} counter\nsockbus_accel_{name} {v}"
        );
    }
}

/// Keeps the fast path attached while alive; dropping it detaches.
#[derive(Debug)]
pub struct AccelGuard {
    path: Option<Arc<FastPath>>,
}

impl AccelGuard {
    pub fn is_active(&self) -> bool {
        self.path.is_some()
    }

    /// Counters of the attached programs (None when not active).
    pub fn stats(&self) -> Option<Stats> {
        self.path.as_ref().and_then(|p| p.stats().ok())
    }
}

impl Drop for AccelGuard {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            routes::uninstall();
            set(AccelState::Off, "detached".into(), None);
            // The global no longer holds it: this is the last reference.
            drop(p);
            tracing::info!("fast path: detached");
        }
    }
}

/// Starts the fast path as `mode` says and logs one line saying which
/// transport is in use and why, and whether direct delivery is on: wanted
/// unless `direct_off` says why not; turned off, saying why, when its
/// self-test check fails. Errors only for `--accel on`.
pub fn start(
    mode: AccelMode,
    opts: &AttachOptions,
    direct_off: Option<&str>,
) -> Result<AccelGuard, AttachError> {
    let direct = direct_off.is_none();
    let ports = opts
        .ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    if mode == AccelMode::Off {
        let reason = "disabled by --accel off".to_string();
        tracing::info!("fast path: off (plain TCP): {reason}");
        set(AccelState::Off, reason, None);
        return Ok(AccelGuard { path: None });
    }
    let t = std::time::Instant::now();
    let attached = FastPath::attach(opts).and_then(|p| {
        if p.mounted_cgroup() {
            tracing::info!(
                "fast path: cgroup v2 was not mounted; mounted it at {}",
                cgroup::FALLBACK_MOUNT
            );
        }
        let attach_time = t.elapsed();
        match selftest::run(&p) {
            Ok(took) => Ok((p, attach_time, took)),
            // Dropping `p` detaches the programs again.
            Err(f) => Err(AttachError::SelfTest {
                check: f.check,
                detail: f.detail,
            }),
        }
    });
    match attached {
        Ok((p, attach_time, self_test)) => {
            let reason = format!(
                "eBPF sockmap attached at cgroup {} for ports {ports}",
                p.cgroup().display()
            );
            let (direct_on, direct_reason) = if let Some(why) = direct_off {
                (false, why.to_string())
            } else {
                match selftest::run_direct(&p).and_then(|took| {
                    routes::enable(&p)
                        .map(|()| took)
                        .map_err(|e| selftest::Failure {
                            check: selftest::DIRECT_CHECK,
                            detail: format!("cannot switch direct delivery on: {e}"),
                        })
                }) {
                    Ok(took) => (
                        true,
                        format!("self-test check direct passed in {} ms", took.as_millis()),
                    ),
                    Err(f) => (false, format!("self-test failed: {f}")),
                }
            };
            let line = format!(
                "fast path: on: {reason} ({} ms; self-test passed in {} ms); direct delivery {}: {direct_reason}",
                attach_time.as_millis(),
                self_test.as_millis(),
                if direct_on { "on" } else { "off" },
            );
            // A wanted feature switched off by a failed check is worth a WARN.
            if direct && !direct_on {
                tracing::warn!("{line}");
            } else {
                tracing::info!("{line}");
            }
            let p = Arc::new(p);
            set(AccelState::Active, reason, Some(p.clone()));
            set_direct(direct_on, direct_reason);
            if direct_on {
                routes::install(&p);
            }
            Ok(AccelGuard { path: Some(p) })
        }
        Err(e @ AttachError::SelfTest { .. }) if mode == AccelMode::Auto => {
            let reason = e.to_string();
            tracing::warn!(
                "fast path: off (plain TCP): {reason}; this kernel's sockmap is not used"
            );
            set(AccelState::Fallback, reason, None);
            Ok(AccelGuard { path: None })
        }
        Err(e) if mode == AccelMode::Auto => {
            let reason = e.to_string();
            tracing::info!(
                "fast path: off (plain TCP): {reason}; a node agent (sockbus-broker accel agent) may still accelerate these connections"
            );
            set(AccelState::Fallback, reason, None);
            Ok(AccelGuard { path: None })
        }
        Err(e) => {
            set(AccelState::Off, e.to_string(), None);
            Err(e)
        }
    }
}

/// Reports the fast path on the broker's `/metrics`, `/v1/status` (as
/// `fast_path`) and status page. Register it on `State::metrics().sources`.
#[derive(Debug, Default)]
pub struct MetricsSource;

impl crate::metrics::Source for MetricsSource {
    fn name(&self) -> &'static str {
        "fast_path"
    }

    fn prometheus(&self, out: &mut String) {
        render_prometheus(out);
    }

    fn status(&self) -> serde_json::Value {
        let s = status();
        serde_json::json!({
            "state": s.state.as_str(),
            "reason": s.reason,
            "sockets": s.sockets,
            "sockets_added": s.stats.sockets_added,
            "add_failures": s.stats.add_failures,
            "redirect_verdicts": s.stats.redirect_verdicts,
            "bytes_redirected": s.stats.bytes_redirected,
            "misses": s.stats.misses,
            "direct_messages": s.stats.direct_msgs,
            "direct_bytes": s.stats.direct_bytes,
            "direct_fallbacks": s.stats.direct_fallbacks,
            "direct_unaligned": s.stats.direct_broken,
            "stalls": guard::stalls(),
            "direct": s.direct,
            "direct_reason": s.direct_reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_name_every_state_and_counter() {
        let mut out = String::new();
        render_prometheus(&mut out);
        for name in [
            "sockbus_accel_active ",
            "sockbus_accel_state{state=\"active\"}",
            "sockbus_accel_state{state=\"fallback\"}",
            "sockbus_accel_state{state=\"off\"}",
            "sockbus_accel_sockets ",
            "sockbus_accel_sockets_added_total ",
            "sockbus_accel_add_failures_total ",
            "sockbus_accel_redirect_verdicts_total ",
            "sockbus_accel_bytes_redirected_total ",
            "sockbus_accel_misses_total ",
            "sockbus_accel_stalls_total ",
        ] {
            assert!(out.contains(name), "{name} missing:\n{out}");
        }
        // Every sample line is `name[{labels}] value`, every family typed.
        for line in out.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').expect("sample");
            assert!(v.parse::<u64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn off_mode_never_tries_and_says_so() {
        let g = start(
            AccelMode::Off,
            &AttachOptions {
                ports: vec![7420],
                ..Default::default()
            },
            None,
        )
        .expect("off never fails");
        assert!(!g.is_active());
        let s = status();
        assert_eq!(s.state, AccelState::Off);
        assert!(s.reason.contains("--accel off"), "{}", s.reason);
    }
}
