//! Starts the brokers `compare` measures and makes sure they stop: on
//! return, on error (the guard's Drop), on Ctrl-C (the command turns the
//! signal into an error, so Drop runs), and even if this process is killed
//! outright (the kernel's parent-death signal).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A server process that is stopped when dropped.
pub struct ServerProc {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub log: PathBuf,
    child: Child,
}

impl ServerProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `bin args` with output to `log`, then waits until `addr`
    /// accepts connections.
    pub fn start(
        name: &'static str,
        bin: &Path,
        args: &[String],
        addr: SocketAddr,
        dir: &Path,
    ) -> anyhow::Result<ServerProc> {
        Self::start_env(name, bin, args, &[], addr, dir)
    }

    /// [`ServerProc::start`] with environment variables set for the server
    /// (a setting an older build ignores, where it would refuse a flag).
    pub fn start_env(
        name: &'static str,
        bin: &Path,
        args: &[String],
        env: &[(&str, &str)],
        addr: SocketAddr,
        dir: &Path,
    ) -> anyhow::Result<ServerProc> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Its own process group: a Ctrl-C in the terminal reaches only
            // us, and we stop the servers in order.
            .process_group(0);
        // Settings meant for the user's own broker must not leak into this one.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SOCKBUS_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied());
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                // If this process dies without running Drop (SIGKILL), the
                // kernel stops the server too.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut p = ServerProc {
            name,
            addr,
            log,
            child,
        };
        p.wait_ready(Duration::from_secs(10))?;
        Ok(p)
    }

    fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited at start-up ({status}): {}",
                    self.name,
                    log_tail(&self.log)
                );
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not accept connections on {} within {within:?}: {}",
                    self.name,
                    self.addr,
                    log_tail(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, up to 3 s to exit, then SIGKILL.
    pub fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: signalling our own child, whose pid we hold and have not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    if lines.is_empty() {
        format!("no output (log {})", path.display())
    } else {
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free port")?;
    Ok(l.local_addr()?)
}

/// `name` in a directory of $PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    find_in(name, std::env::var_os("PATH")?.as_os_str())
}

fn find_in(name: &str, path: &std::ffi::OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub fn find_nats_server(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    nats_server_from(explicit, &std::env::var_os("PATH").unwrap_or_default())
}

fn nats_server_from(explicit: Option<&Path>, path: &std::ffi::OsStr) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if is_executable(p) {
            return Ok(p.to_path_buf());
        }
        bail!("--nats-bin {}: not an executable file", p.display());
    }
    find_in("nats-server", path).context(
        "nats-server not found on PATH: install it with `apt-get install nats-server` \
         (or pass --nats-bin PATH)",
    )
}

/// `--broker-bin`, else `sockbus-broker` next to this executable (both live
/// in target/<profile>/ after `cargo build`).
pub fn find_sockbus_broker(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if is_executable(p) {
            return Ok(p.to_path_buf());
        }
        bail!("--broker-bin {}: not an executable file", p.display());
    }
    let me = std::env::current_exe().context("cannot locate this executable")?;
    let dir = me.parent().context("this executable has no directory")?;
    let candidate = dir.join("sockbus-broker");
    if is_executable(&candidate) {
        return Ok(candidate);
    }
    bail!(
        "sockbus-broker not found next to {} : build it with \
         `cargo build --release -p sockbus-broker` (same profile as the load tester) \
         or pass --broker-bin PATH",
        me.display()
    )
}

/// First line of `bin --version`.
pub fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown version".into())
}

/// A scratch directory removed on drop (server logs, working directories).
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(prefix: &str) -> anyhow::Result<ScratchDir> {
        let p = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(ScratchDir(p))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_process_is_stopped_when_the_guard_drops() {
        let dir = ScratchDir::new("sockbus-loadtest-test-guard").unwrap();
        let addr = free_port().unwrap();
        // A stand-in server: python is on every machine of this project.
        let script = format!(
            "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',{}))\ns.listen()\ntime.sleep(60)",
            addr.port()
        );
        let Some(py) = find_in_path("python3") else {
            eprintln!("skipped: python3 not on PATH");
            return;
        };
        let p = ServerProc::start("stand-in", &py, &["-c".into(), script], addr, &dir.0).unwrap();
        let pid = p.pid();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(p);
        // Reaped by stop(): the pid is gone (or reused by something else).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!stat.contains("python"), "server still running after drop");
    }

    #[test]
    fn a_server_that_exits_at_once_is_reported_with_its_output() {
        let dir = ScratchDir::new("sockbus-loadtest-test-exit").unwrap();
        let addr = free_port().unwrap();
        let sh = find_in_path("sh").unwrap();
        let e = ServerProc::start(
            "broken",
            &sh,
            &["-c".into(), "echo boom: bad flag >&2; exit 3".into()],
            addr,
            &dir.0,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("broken exited at start-up") && e.contains("boom: bad flag"),
            "{e}"
        );
    }

    #[test]
    fn missing_nats_server_names_the_package() {
        let empty = ScratchDir::new("sockbus-loadtest-test-path").unwrap();
        let e = nats_server_from(None, empty.0.as_os_str())
            .unwrap_err()
            .to_string();
        assert!(e.contains("apt-get install nats-server"), "{e}");
        let e = nats_server_from(
            Some(Path::new("/nonexistent/nats-server")),
            empty.0.as_os_str(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--nats-bin"), "{e}");
    }
}
