use clap::{Parser, Subcommand};
use sockbus_loadtest::commands::{ceiling, cluster, compare, run, sub_memory};
use tracing_subscriber::EnvFilter;

/// Load generator for sockbus and NATS: scenarios, side-by-side comparisons, reports.
#[derive(Parser, Debug)]
#[command(name = "sockbus-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one scenario against one broker.
    Run(run::RunArgs),
    /// Start sockbus-broker and nats-server, run scenarios against both, print ratios.
    Compare(compare::CompareArgs),
    /// Three sockbus brokers in a mesh beside a three-node NATS cluster: publisher on A, subscribers on B and C.
    CompareCluster(cluster::ClusterArgs),
    /// A trivial hyper HTTP server answering 204 to every POST: the ceiling for `hey`.
    HyperCeiling(ceiling::CeilingArgs),
    /// Start sockbus-broker and nats-server, measure the memory N subscriptions take and what is given back.
    SubMemory(sub_memory::SubMemoryArgs),
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    // The command futures run on this (main) thread: `compare` relies on it
    // so its servers' parent-death signal is tied to the process's lifetime.
    let r = rt.block_on(async move {
        match cli.cmd {
            Cmd::Run(a) => run::execute(a).await,
            Cmd::Compare(a) => compare::execute(a).await,
            Cmd::CompareCluster(a) => cluster::execute(a).await,
            Cmd::HyperCeiling(a) => ceiling::execute(a).await,
            Cmd::SubMemory(a) => sub_memory::execute(a).await,
        }
    });
    // Don't wait for lingering connection tasks of the client libraries.
    rt.shutdown_background();
    if let Err(e) = r {
        fail(e);
    }
}

fn fail(e: anyhow::Error) -> ! {
    // One line, whatever the error chain holds.
    eprintln!("sockbus-loadtest: {}", format!("{e:#}").replace('\n', " "));
    std::process::exit(1);
}
