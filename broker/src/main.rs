use anyhow::{bail, Context};
use clap::Parser;
use sockbus_broker::config::LogFormat;
use sockbus_broker::http::HttpServer;
use sockbus_broker::{Options, Server};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// sockbus message broker.
#[derive(Parser, Debug)]
#[command(name = "sockbus-broker", version, about)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    opts: Options,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// The eBPF same-node fast path.
    #[command(subcommand)]
    Accel(AccelCommand),
    /// Check a stream directory offline (read only): every segment, every
    /// record's CRC. Exit code 0 when intact, 3 when damage was found.
    VerifyStream {
        /// The stream's directory (`<data-dir>/streams/NAME`).
        dir: std::path::PathBuf,
        /// Also print every valid record (seq, subject, payload) as a JSON line.
        #[arg(long)]
        records: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
enum AccelCommand {
    /// Attach the fast path for the whole node and serve its metrics until SIGTERM (no broker).
    Agent {
        /// Ports to accelerate, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "7420")]
        ports: Vec<u16>,
        /// cgroup v2 directory to attach at, absolute or relative to the cgroup v2 root (default: the root).
        #[arg(long)]
        cgroup: Option<std::path::PathBuf>,
        /// Prometheus metrics listen address (GET /metrics).
        #[arg(long, default_value = sockbus_broker::accel::agent::DEFAULT_METRICS)]
        metrics: String,
    },
}

/// `sockbus-broker verify-stream DIR`: one JSON line per record (with
/// `--records`), one per segment, then a summary; exits 3 on damage.
fn verify_stream(dir: &std::path::Path, records: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let out = std::io::stdout();
    let mut out = std::io::BufWriter::new(out.lock());
    let mut n = 0u64;
    let mut werr = None;
    let segs = sockbus_broker::offline::verify_dir(dir, |r| {
        n += 1;
        if records && werr.is_none() {
            let line = serde_json::json!({
                "seq": r.seq,
                "subject": r.subject,
                "payload": String::from_utf8_lossy(r.payload),
            });
            if let Err(e) = writeln!(out, "{line}") {
                werr = Some(e);
            }
        }
    })
    .with_context(|| format!("cannot read stream directory {}", dir.display()))?;
    if let Some(e) = werr {
        return Err(e.into());
    }
    let damaged = segs.iter().filter(|s| s.damaged()).count();
    for s in &segs {
        writeln!(out, "{}", serde_json::json!({ "segment": s }))?;
    }
    let lost: u64 = segs.iter().map(|s| s.lost + s.missing_before_next).sum();
    let tail: u64 = segs.iter().map(|s| s.tail_bytes).sum();
    writeln!(
        out,
        "{}",
        serde_json::json!({"records": n, "segments": segs.len(), "damaged_segments": damaged,
            "lost_seqs": lost, "tail_bytes": tail})
    )?;
    out.flush()?;
    if damaged > 0 {
        std::process::exit(3);
    }
    Ok(())
}

/// Blocking-pool threads beyond one per core: the broker's threads stay
/// under 2 x cores + 16 (main, workers, the pool, segment verification).
const BLOCKING_THREADS_OVER_CORES: usize = 6;

/// Raises the soft open-file limit to the hard one: streams keep half of it
/// for their files (docs/storage.md, "Open files"), connections the rest.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => info!("open-file limit (RLIMIT_NOFILE): {n}"),
        Err(e) => warn!("cannot raise the open-file limit (RLIMIT_NOFILE): {e}"),
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // One line, whatever the error chain holds.
        eprintln!("sockbus-broker: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::VerifyStream { dir, records }) = &cli.command {
        return verify_stream(dir, *records);
    }
    if let Some(Command::Accel(AccelCommand::Agent {
        ports,
        cgroup,
        metrics,
    })) = cli.command
    {
        return run_agent(ports, cgroup, &metrics);
    }
    let config = cli.opts.resolve()?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match config.log_format {
        // log_internal_errors(false): with stderr closed (a log pipe gone),
        // tracing-subscriber would report the failed write with eprintln!,
        // which panics, and a panicking signal task never starts the drain.
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .log_internal_errors(false)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .log_internal_errors(false)
            .init(),
    }
    if !config.peers.is_empty() && config.cluster.is_none() {
        bail!("--peers needs --cluster ADDR: peers dial this broker's route port too");
    }
    raise_open_file_limit();
    // A poller helps only where its thread owns the I/O driver; with more
    // workers another one sleeps in epoll_wait holding it.
    let mut rt = if config.busy_poll.is_some() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    // Disk work of every stream (writer rounds, fsyncs, consumer reads)
    // runs on the blocking pool: bounded, so 10,000 streams busy at once
    // queue for a few threads instead of starting hundreds.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = rt
        .enable_all()
        .max_blocking_threads(cores + BLOCKING_THREADS_OVER_CORES)
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let _busy_poll = config.busy_poll.map(|w| {
            info!(
                "busy-polling: connections run on one thread that polls for {w:?} after each read or write instead of sleeping (--busy-poll)"
            );
            sockbus_protocol::busy_poll::spawn(w)
        });
        let mode = config.accel;
        let direct_off = (!config.accel_direct).then_some("off unless --accel-direct on");
        let stall_timeout = config.accel_stall_timeout;
        let mut accel_opts = sockbus_broker::accel::AttachOptions {
            ports: config.accel_ports.clone(),
            cgroup: config.accel_cgroup.clone(),
            max_sockets: None,
        };
        let server = Server::bind(config).await?;
        if accel_opts.ports.is_empty() {
            accel_opts.ports.push(server.local_addr().port());
        }
        // Detaches when dropped, after the server has drained.
        let _accel = sockbus_broker::accel::start(mode, &accel_opts, direct_off)
            .map_err(|e| anyhow::anyhow!("--accel on: cannot use the eBPF fast path: {e}"))?;
        server
            .state()
            .metrics()
            .sources
            .register(std::sync::Arc::new(sockbus_broker::accel::MetricsSource));
        server.bind_direct_routes();
        if let Some(p) = &_busy_poll {
            server
                .state()
                .metrics()
                .sources
                .register(std::sync::Arc::new(sockbus_broker::metrics::BusyPollSource(
                    p.window(),
                )));
        }
        let http = start_http(&server).await?;
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            sd.cancel();
            info!("signal received: draining");
        });
        let http = http.map(|h| tokio::spawn(h.run(shutdown.clone())));
        sockbus_broker::accel::guard::spawn(stall_timeout, shutdown.clone());
        server.run(shutdown).await?;
        if let Some(h) = http {
            h.await.context("HTTP gateway task")??;
        }
        Ok(())
    })
}

/// Binds the HTTP gateway. The default address is best effort: when it is
/// taken (a second broker on the same host) the broker runs without HTTP and
/// says so; an address given with --http must work.
async fn start_http(server: &Server) -> anyhow::Result<Option<HttpServer>> {
    let state = server.state();
    let Some(addr) = state.config().http else {
        info!("HTTP gateway off (--http off)");
        return Ok(None);
    };
    match HttpServer::bind(addr, state.clone()).await {
        Ok(h) => Ok(Some(h)),
        Err(e) if !state.config().http_explicit => {
            warn!("HTTP gateway off: {e:#} (give --http ADDR to choose another address, --http off to disable it)");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn run_agent(
    ports: Vec<u16>,
    cgroup: Option<std::path::PathBuf>,
    metrics: &str,
) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .init();
    let metrics = sockbus_broker::config::parse_addr("metrics", metrics)?;
    let opts = sockbus_broker::accel::AttachOptions {
        ports,
        cgroup,
        max_sockets: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            sd.cancel();
            info!("signal received: detaching");
        });
        sockbus_broker::accel::agent::run(opts, metrics, shutdown).await
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; SIGTERM will not drain");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
