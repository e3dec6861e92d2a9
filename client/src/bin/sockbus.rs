//! `sockbus`: publish, subscribe, request and reply from the command line.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

use sockbus_client::{Client, ConnectOptions, Error, Headers, Overflow};

#[derive(Parser)]
#[command(name = "sockbus", version, about = "sockbus command-line client")]
struct Cli {
    /// Broker URL(s), comma separated.
    #[arg(long, global = true, env = "SOCKBUS_URL", default_value = sockbus_client::DEFAULT_URL)]
    server: String,
    /// User name to authenticate as (with --password).
    #[arg(long, global = true, env = "SOCKBUS_USER")]
    user: Option<String>,
    /// Password of --user.
    #[arg(long, global = true, env = "SOCKBUS_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Token to authenticate with, instead of a user and password.
    #[arg(long, global = true, env = "SOCKBUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM CA certificates a sockbus+tls:// broker's certificate must chain
    /// to (default: the system's CAs).
    #[arg(long, global = true, env = "SOCKBUS_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for brokers that require one (with --tls-key).
    #[arg(long, global = true, env = "SOCKBUS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, global = true, env = "SOCKBUS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Credentials from the flags or environment, applied to every connection.
static CREDENTIALS: std::sync::OnceLock<(Option<String>, Option<String>, Option<String>)> =
    std::sync::OnceLock::new();
/// The TLS settings of this run (global flags), for every connection it makes.
static TLS: std::sync::OnceLock<sockbus_client::TlsOptions> = std::sync::OnceLock::new();

#[derive(Subcommand)]
enum Cmd {
    /// Publish DATA (or stdin) to SUBJECT; exits once the broker has accepted every message,
    /// and once stored when a stream captures SUBJECT.
    Pub {
        subject: String,
        data: Option<String>,
        /// Publish the message N times.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Header as NAME:VALUE (repeatable).
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Print each stored message's ack, {"stream":..,"seq":..}, one per line.
        #[arg(long)]
        ack: bool,
    },
    /// Print each message's payload followed by a newline, at the pace stdout takes them;
    /// a message lost on the way is reported on stderr with a non-zero exit.
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
    /// Manage durable streams.
    Stream {
        #[command(subcommand)]
        cmd: StreamCmd,
    },
    /// Print a stream's payloads in order, acking each; a durable consumer resumes where it left off.
    Consume {
        stream: String,
        /// Durable consumer name.
        #[arg(long)]
        durable: String,
        /// Where a new consumer starts: first, last, seq:N or time:RFC3339.
        #[arg(long, default_value = "first")]
        from: String,
        /// Exit after N messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Read a password (or token) on stdin and print its argon2id hash, for
    /// `password = "..."` / `token = "..."` in the broker's [[users]].
    Passwd,
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

#[derive(Subcommand)]
enum StreamCmd {
    /// Create a durable stream capturing SUBJECTS.
    Add {
        name: String,
        /// Subject patterns to capture, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        subjects: Vec<String>,
        /// When a publish is acked: always (on disk), interval, never.
        #[arg(long, default_value = "always")]
        fsync: String,
        /// Drop messages older than this (e.g. 30m, 24h, 7d).
        #[arg(long, value_parser = parse_age)]
        max_age: Option<Duration>,
        /// Keep about this many bytes (e.g. 1GiB).
        #[arg(long, value_parser = parse_size)]
        max_bytes: Option<u64>,
        /// Keep about this many messages.
        #[arg(long)]
        max_msgs: Option<u64>,
        /// Copies kept by a cluster: 1, 3 or 5 (one Raft group on that
        /// many nodes; docs/storage.md, "Replicated streams").
        #[arg(long, default_value_t = 1)]
        replicas: u32,
    },
    /// List streams.
    Ls,
    /// Show a stream's configuration and state (and, when replicated, its
    /// leader and each replica's lag).
    Info {
        name: String,
        /// Print the API's JSON answer instead.
        #[arg(long)]
        json: bool,
    },
    /// Delete a stream and its data.
    Rm { name: String },
    /// Replace a replica of a replicated stream that is gone for good by
    /// another node of the cluster (run against the group's leader).
    ReplacePeer {
        name: String,
        /// The replica to drop (its --node-id).
        #[arg(long)]
        old: String,
        /// The node to take its place (its --node-id).
        #[arg(long)]
        new: String,
    },
}

fn parse_age(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (examples: 30m, 24h, 7d): {e}"))
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 1048576, 512MiB, 1GiB)"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("unknown size unit in {s:?} (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
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
    let _ = TLS.set(sockbus_client::TlsOptions {
        ca: cli.tls_ca.clone(),
        cert: cli.tls_cert.clone(),
        key: cli.tls_key.clone(),
    });
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
            // One line a person understands; a bare `req` outcome as DESIGN.md words it.
            let typed = e.chain().find_map(|c| c.downcast_ref::<Error>());
            match typed {
                Some(Error::Authorization(_)) => eprintln!("sockbus: authorization failed"),
                Some(e @ Error::PermissionDenied { .. }) => eprintln!("sockbus: {e}"),
                _ => {}
            }
            if matches!(
                typed,
                Some(Error::Authorization(_) | Error::PermissionDenied { .. })
            ) {
                return ExitCode::FAILURE;
            }
            match e.downcast_ref::<Error>().filter(|_| e.chain().count() == 1) {
                Some(Error::NoResponders) => eprintln!("sockbus: no responders"),
                Some(Error::Timeout) => eprintln!("sockbus: timeout"),
                _ => eprintln!("sockbus: {}", format!("{e:#}").replace('\n', " ")),
            }
            ExitCode::FAILURE
        }
    }
}

/// `server` without the credentials a URL may carry.
fn redact(server: &str) -> String {
    server
        .split(',')
        .map(|u| match u.rsplit_once('@') {
            Some((info, host)) => match info.split_once("://") {
                Some((scheme, _)) => format!("{scheme}://***@{host}"),
                None => format!("***@{host}"),
            },
            None => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn options() -> ConnectOptions {
    let mut o = ConnectOptions::new().name("sockbus-cli").max_reconnects(3);
    if let Some((user, password, token)) = CREDENTIALS.get() {
        if let Some(u) = user {
            o = o.user_password(u, password.as_deref().unwrap_or(""));
        }
        if let Some(t) = token {
            o = o.token(t.as_bytes());
        }
    }
    if let Some(t) = TLS.get() {
        if let Some(ca) = &t.ca {
            o = o.tls_ca(ca);
        }
        if let (Some(c), Some(k)) = (&t.cert, &t.key) {
            o = o.tls_client_cert(c, k);
        }
    }
    o
}

/// `sockbus passwd`: the secret is the first line of stdin, without its line end.
fn passwd() -> anyhow::Result<()> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("cannot read stdin")?;
    let secret = s.lines().next().unwrap_or("");
    if secret.is_empty() {
        bail!("no password on stdin");
    }
    let salt = SaltString::generate(&mut OsRng);
    let hash = argon2::Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("cannot hash: {e}"))?;
    println!("{hash}");
    Ok(())
}

async fn connect(server: &str) -> anyhow::Result<Client> {
    connect_with(server, options()).await
}

async fn connect_with(server: &str, opts: ConnectOptions) -> anyhow::Result<Client> {
    opts.connect(server)
        .await
        .with_context(|| format!("cannot connect to {}", redact(server)))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.password.is_some() && cli.user.is_none() {
        bail!("--password needs --user");
    }
    let _ = CREDENTIALS.set((cli.user.clone(), cli.password.clone(), cli.token.clone()));
    match cli.cmd {
        Cmd::Passwd => passwd()?,
        Cmd::Stream { cmd } => stream_cmd(&cli.server, cmd).await?,
        Cmd::Consume {
            stream,
            durable,
            from,
            count,
        } => consume(&cli.server, &stream, &durable, &from, count).await?,
        Cmd::Pub {
            subject,
            data,
            count,
            headers,
            ack,
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
            // The broker says which stream, if any, stores this subject.
            let stream = client
                .stream_for_subject(&subject)
                .await
                .context("cannot ask the broker which stream stores the subject")?;
            if stream.is_some() {
                publish_stored(&client, &subject, &hdrs, &payload, count, ack).await?;
            } else {
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
                if ack {
                    eprintln!("sockbus: no stream captures {subject:?}: published, not stored");
                }
            }
            client.close().await?;
        }
        Cmd::Sub {
            subject,
            queue,
            count,
        } => subscribe(&cli.server, &subject, queue.as_deref(), count).await?,
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

/// `sockbus sub`: prints payloads at the pace stdout takes them. When stdout
/// is slower than the messages come, the SDK holds the connection
/// ([`Overflow::Wait`]) instead of dropping: the broker keeps what it would
/// send, up to its `--max-pending`, and beyond that cuts the connection off.
/// Every message lost on the way is an error, never silent: a dropped one,
/// or a lost connection (not remade: what was published meanwhile is gone,
/// and printing on after a gap would hide it).
async fn subscribe(
    server: &str,
    subject: &str,
    queue: Option<&str>,
    count: Option<u64>,
) -> anyhow::Result<()> {
    use futures_util::FutureExt;
    let opts = options()
        .max_reconnects(0)
        .when_subscription_full(Overflow::Wait)
        // Little buffered here: the pipe sets the pace, the broker holds the rest.
        .subscription_capacity(8192)
        .subscription_pending_bytes(8 << 20);
    let client = connect_with(server, opts).await?;
    let lost = client.disconnected();
    tokio::pin!(lost);
    let mut sub = match queue {
        Some(q) => client.queue_subscribe(subject, q).await?,
        None => client.subscribe(subject).await?,
    };
    // Make sure the broker has the subscription before we report anything.
    client.flush().await?;
    if count == Some(0) {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let mut n = 0u64;
    // Ends when the connection does, after what arrived before.
    while let Some(m) = sub.next().await {
        out.write_all(&m.payload)
            .and_then(|_| out.write_all(b"\n"))
            .and_then(|_| out.flush())
            .with_context(|| format!("cannot write to stdout after {n} messages"))?;
        n += 1;
        let dropped = sub.dropped();
        if dropped > 0 {
            bail!("{dropped} messages dropped after {n}: the subscription's buffer was full");
        }
        if count.is_some_and(|c| n >= c) {
            return Ok(());
        }
    }
    if let Some(e) = sub.refusal() {
        return Err(e.into());
    }
    let why = (&mut lost).now_or_never().unwrap_or(Error::Closed);
    let dropped = sub.dropped();
    let held = if dropped > 0 {
        format!(" ({dropped} received but not printed)")
    } else {
        String::new()
    };
    bail!(
        "connection to the broker lost after {n} messages{held}: {why}; messages published since \
         are missing (a broker cuts off a subscriber more than its --max-pending behind)"
    );
}

/// Durable publishes still waiting for their ack at any time: enough to
/// keep a stream's group commit busy, bounded so memory is too.
const ACK_WINDOW: usize = 256;

/// Publishes `count` copies to a subject a stream captures and returns once
/// every one is stored (as the stream's fsync policy says), printing the
/// acks with `print_acks`. Up to [`ACK_WINDOW`] wait for their acks at once.
async fn publish_stored(
    client: &Client,
    subject: &str,
    headers: &Headers,
    payload: &[u8],
    count: u64,
    print_acks: bool,
) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let mut acks = futures_util::stream::iter(0..count)
        .map(|i| async move {
            let r = client
                .publish_durable_with_headers(subject, headers, payload)
                .await;
            (i, r)
        })
        .buffered(ACK_WINDOW);
    let mut out = std::io::stdout().lock();
    while let Some((i, r)) = acks.next().await {
        let a = r.with_context(|| {
            format!(
                "message {} of {count} to {subject:?} is not known to be stored",
                i + 1
            )
        })?;
        if print_acks {
            writeln!(out, "{}", serde_json::to_string(&a)?)?;
        }
    }
    out.flush()?;
    Ok(())
}

async fn stream_cmd(server: &str, cmd: StreamCmd) -> anyhow::Result<()> {
    use sockbus_client::streams::{Fsync, StreamConfig};
    let client = connect(server).await?;
    let mut out = std::io::stdout().lock();
    match cmd {
        StreamCmd::Add {
            name,
            subjects,
            fsync,
            max_age,
            max_bytes,
            max_msgs,
            replicas,
        } => {
            let mut cfg = StreamConfig::new(&name, subjects);
            cfg.replicas = (replicas != 1).then_some(replicas);
            cfg.fsync = match fsync.as_str() {
                "always" => Fsync::Always,
                "interval" => Fsync::Interval,
                "never" => Fsync::Never,
                f => bail!("--fsync must be always, interval or never, got {f:?}"),
            };
            cfg.max_age_ms = max_age.map(|d| d.as_millis() as u64);
            cfg.max_bytes = max_bytes;
            cfg.max_msgs = max_msgs;
            client.stream_add(&cfg).await?;
            writeln!(out, "stream {name} created")?;
        }
        StreamCmd::Ls => {
            let list = client.stream_list().await?;
            writeln!(
                out,
                "{:<20} {:>10} {:>14} {:>10} {:>10}  SUBJECTS",
                "NAME", "MESSAGES", "BYTES", "FIRST", "LAST"
            )?;
            for s in list {
                writeln!(
                    out,
                    "{:<20} {:>10} {:>14} {:>10} {:>10}  {}",
                    s.config.name,
                    s.state.messages,
                    s.state.bytes,
                    s.state.first_seq,
                    s.state.last_seq,
                    s.config.subjects.join(",")
                )?;
            }
        }
        StreamCmd::Info { name, json } => {
            let s = client.stream_info(&name).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
                return Ok(());
            }
            let c = &s.config;
            let st = &s.state;
            let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
            writeln!(out, "name:            {}", c.name)?;
            writeln!(out, "subjects:        {}", c.subjects.join(","))?;
            writeln!(out, "fsync:           {:?}", c.fsync)?;
            writeln!(
                out,
                "max age:         {}",
                c.max_age_ms
                    .map_or("-".into(), |m| humantime::format_duration(
                        Duration::from_millis(m)
                    )
                    .to_string())
            )?;
            writeln!(out, "max bytes:       {}", opt(c.max_bytes))?;
            writeln!(out, "max msgs:        {}", opt(c.max_msgs))?;
            writeln!(out, "messages:        {}", st.messages)?;
            writeln!(out, "bytes:           {}", st.bytes)?;
            writeln!(out, "first seq:       {}", st.first_seq)?;
            writeln!(out, "last seq:        {}", st.last_seq)?;
            writeln!(
                out,
                "first time:      {}",
                st.first_ts.as_deref().unwrap_or("-")
            )?;
            writeln!(
                out,
                "last time:       {}",
                st.last_ts.as_deref().unwrap_or("-")
            )?;
            writeln!(out, "segments:        {}", st.segments)?;
            writeln!(out, "consumers:       {}", st.consumers)?;
            writeln!(out, "damaged records: {}", st.damaged_records)?;
            writeln!(out, "replicas:        {}", c.replicas())?;
            if let Some(cl) = &s.cluster {
                writeln!(
                    out,
                    "leader:          {}",
                    cl.leader.as_deref().unwrap_or("-")
                )?;
                writeln!(out, "term:            {}", cl.term)?;
                writeln!(out, "applied index:   {}", cl.committed)?;
                for r in &cl.replicas {
                    writeln!(
                        out,
                        "replica {:<12} {}matched {} lag {}",
                        r.name,
                        if r.leader { "leader, " } else { "" },
                        opt(r.matched),
                        opt(r.lag)
                    )?;
                }
            }
        }
        StreamCmd::ReplacePeer { name, old, new } => {
            client.stream_replace_peer(&name, &old, &new).await?;
            writeln!(out, "stream {name}: replica {old} replaced by {new}")?;
        }
        StreamCmd::Rm { name } => {
            client.stream_delete(&name).await?;
            writeln!(out, "stream {name} deleted")?;
        }
    }
    client.close().await?;
    Ok(())
}

async fn consume(
    server: &str,
    stream: &str,
    durable: &str,
    from: &str,
    count: Option<u64>,
) -> anyhow::Result<()> {
    use sockbus_client::streams::{ConsumerConfig, Start};
    let start: Start = from
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--from {e}"))?;
    if count == Some(0) {
        return Ok(());
    }
    let client = connect(server).await?;
    let batch = count.map_or(256, |c| c.min(256) as usize);
    let mut c = client
        .consumer(
            stream,
            ConsumerConfig::durable(durable).start(start).batch(batch),
        )
        .await?;
    let mut out = std::io::stdout().lock();
    let mut n = 0u64;
    loop {
        let left = count.map_or(usize::MAX, |c| (c - n) as usize);
        let Some(m) = c.next_limited(Duration::from_secs(3600), left).await? else {
            continue;
        };
        out.write_all(m.payload())?;
        out.write_all(b"\n")?;
        out.flush()?;
        n += 1;
        if count.is_some_and(|c| n >= c) {
            // Waits until the broker has stored this ack and, with it, every earlier one.
            m.ack_sync().await?;
            break;
        }
        m.ack().await?;
    }
    client.close().await?;
    Ok(())
}
