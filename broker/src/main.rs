use anyhow::{bail, Context};
use clap::Parser;
use sockbus_broker::config::{AccelMode, LogFormat};
use sockbus_broker::{Options, Server};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// sockbus message broker.
#[derive(Parser, Debug)]
#[command(name = "sockbus-broker", version, about)]
struct Cli {
    #[command(flatten)]
    opts: Options,
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
    let config = cli.opts.resolve()?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    if config.http.is_some() {
        bail!("--http: the HTTP gateway is not part of this build yet");
    }
    if !config.peers.is_empty() && config.cluster.is_none() {
        bail!("--peers needs --cluster ADDR: peers dial this broker's route port too");
    }
    match config.accel {
        AccelMode::On => bail!("--accel on: the eBPF fast path is not part of this build yet"),
        AccelMode::Auto => {
            info!("fast path: off (plain TCP): the eBPF fast path is not part of this build yet")
        }
        AccelMode::Off => info!("fast path: off (plain TCP): disabled by --accel off"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let server = Server::bind(config).await?;
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("signal received: draining");
            sd.cancel();
        });
        server.run(shutdown).await
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
