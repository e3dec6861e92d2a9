//! `sockbus`: publish, subscribe, request and reply from the command line.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use sockbus_client::{Client, ConnectOptions, Error, Headers};

#[derive(Parser)]
#[command(name = "sockbus", version, about = "sockbus command-line client")]
struct Cli {
    /// Broker URL(s), comma separated.
    #[arg(long, global = true, env = "SOCKBUS_URL", default_value = sockbus_client::DEFAULT_URL)]
    server: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Publish DATA (or stdin) to SUBJECT; exits once the broker has accepted every message.
    Pub {
        subject: String,
        data: Option<String>,
        /// Publish the message N times.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Header as NAME:VALUE (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
    },
    /// Print each message's payload followed by a newline.
    Sub {
        subject: String,
        /// Join a queue group: each message goes to one member.
        #[arg(long)]
        queue: Option<String>,
        /// Exit after N messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Send a request and print the reply's payload.
    Req {
        subject: String,
        data: String,
        /// How long to wait for a reply (e.g. 500ms, 5s).
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Answer each request on SUBJECT with DATA.
    Reply {
        subject: String,
        data: String,
        /// Exit after answering N requests.
        #[arg(long)]
        count: Option<u64>,
        /// Queue group, so several repliers share the load.
        #[arg(long)]
        queue: Option<String>,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 500ms, 5s, 1m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit in {s:?} (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sockbus: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line a person understands.
            match e.downcast_ref::<Error>() {
                Some(Error::NoResponders) => eprintln!("sockbus: no responders"),
                Some(Error::Timeout) => eprintln!("sockbus: timeout"),
                _ => eprintln!("sockbus: {}", format!("{e:#}").replace('\n', " ")),
            }
            ExitCode::FAILURE
        }
    }
}

async fn connect(server: &str) -> anyhow::Result<Client> {
    ConnectOptions::new()
        .name("sockbus-cli")
        .max_reconnects(3)
        .connect(server)
        .await
        .with_context(|| format!("cannot connect to {server}"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Pub {
            subject,
            data,
            count,
            headers,
        } => {
            let payload = match data {
                Some(d) => d.into_bytes(),
                None => {
                    let mut b = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut b)
                        .context("cannot read stdin")?;
                    b
                }
            };
            let mut hdrs = Headers::new();
            for h in &headers {
                let Some((k, v)) = h.split_once(':') else {
                    bail!("header {h:?} must be NAME:VALUE");
                };
                hdrs.insert(k.trim(), v.trim());
            }
            let client = connect(&cli.server).await?;
            for _ in 0..count {
                if hdrs.is_empty() {
                    client.publish(&subject, &payload).await?;
                } else {
                    client
                        .publish_with_headers(&subject, &hdrs, &payload)
                        .await?;
                }
            }
            client.flush().await?;
            client.close().await?;
        }
        Cmd::Sub {
            subject,
            queue,
            count,
        } => {
            let client = connect(&cli.server).await?;
            let mut sub = match &queue {
                Some(q) => client.queue_subscribe(&subject, q).await?,
                None => client.subscribe(&subject).await?,
            };
            // Make sure the broker has the subscription before we report anything.
            client.flush().await?;
            let mut out = std::io::stdout().lock();
            let mut n = 0;
            if count == Some(0) {
                return Ok(());
            }
            while let Some(m) = sub.next().await {
                out.write_all(&m.payload)?;
                out.write_all(b"\n")?;
                out.flush()?;
                n += 1;
                if count.is_some_and(|c| n >= c) {
                    return Ok(());
                }
            }
            bail!("connection closed after {n} messages");
        }
        Cmd::Req {
            subject,
            data,
            timeout,
        } => {
            let client = connect(&cli.server).await?;
            let m = client
                .request_timeout(&subject, data.as_bytes(), timeout)
                .await?;
            let mut out = std::io::stdout().lock();
            out.write_all(&m.payload)?;
            out.write_all(b"\n")?;
            out.flush()?;
        }
        Cmd::Reply {
            subject,
            data,
            count,
            queue,
        } => {
            let client = connect(&cli.server).await?;
            let mut sub = match &queue {
                Some(q) => client.queue_subscribe(&subject, q).await?,
                None => client.subscribe(&subject).await?,
            };
            client.flush().await?;
            let mut n = 0;
            if count == Some(0) {
                return Ok(());
            }
            while let Some(m) = sub.next().await {
                if let Some(r) = m.reply() {
                    client.publish(r, data.as_bytes()).await?;
                    client.flush().await?;
                    n += 1;
                    if count.is_some_and(|c| n >= c) {
                        return Ok(());
                    }
                }
            }
            bail!("connection closed after {n} replies");
        }
    }
    Ok(())
}
