//! The commands README.md and docs/*.md show, run against a real broker, so
//! that the docs cannot drift from the code: a changed flag, subcommand,
//! route, output or exit code in either makes this test fail.
//!
//! Every ```sh (or ```bash, ```shell) block of those pages is run with
//! bash, in page order, against one broker per page (ephemeral ports,
//! scratch data directory), in a scratch working directory holding
//! [`FIXTURES`]. Before a block runs:
//! - `127.0.0.1:7420` and `127.0.0.1:7480` in its commands become the test
//!   broker's native and HTTP addresses, and `SOCKBUS_URL` points at it;
//! - the `sockbus` cargo built for this test comes first on `PATH`;
//! - `curl` gets `--fail-with-body`, so an HTTP error fails the command the
//!   way a refused CLI command does.
//!
//! What a command must do is read from its trailing comment:
//! - no special comment: exit 0;
//! - `# exit N` or `# exit N: "TEXT"`: exit status N, TEXT on stderr;
//! - `# prints `A` and `B` ...`: stdout is exactly the lines A, B (words
//!   around the backquoted literals are for people); `prints` without a
//!   literal: something on stdout;
//! - `# runs until stopped`: started before the page's other commands and
//!   stopped after them; what it printed must be the ```text block that
//!   follows its block.
//!
//! Not run, explicitly:
//! - a block right after a line `<!-- doc-test: not run: REASON -->` (it
//!   needs a Kubernetes cluster, root, or is a long benchmark). Its commands
//!   are still checked statically: the packages, binaries, examples, tests
//!   and repository paths they name must exist.
//! - the lines in [`STAND_INS`]: the test does their job itself.
//!
//! Needs `bash` and `curl` on PATH (.ci/run installs curl).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sockbus_broker::http::HttpServer;
use sockbus_broker::{Config, Options, Server};
use tokio_util::sync::CancellationToken;

/// Doc lines the test does not run because it does their job itself.
const STAND_INS: &[(&str, &str)] = &[
    (
        "cargo run --release -p sockbus-broker",
        "the test starts a broker itself, on ephemeral ports with a scratch data directory",
    ),
    ("cargo test --workspace", "this test is part of that run"),
    (
        "cargo build --release -p sockbus-client",
        "the test runs the `sockbus` cargo built for it",
    ),
    (
        "export PATH=\"$PWD/target/release:$PATH\"",
        "the test puts that `sockbus` first on PATH",
    ),
];

/// Files the docs' commands read, made in the directory they run in.
const FIXTURES: &[(&str, &str)] = &[
    // docs/http.md publishes it, and shows the SSE event it becomes.
    ("order.json", "{\"id\": 7,\n \"total\": 12}"),
];

/// Marks the ```sh block on the next line as not run, with the reason.
const NOT_RUN: &str = "<!-- doc-test: not run:";
/// Longest a page's commands may take together.
const PAGE_DEADLINE: Duration = Duration::from_secs(90);

/// Fenced blocks whose lines are shell commands.
fn is_shell(lang: &str) -> bool {
    matches!(lang, "sh" | "bash" | "shell")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// README.md and every page under docs/, as paths relative to the root.
fn pages() -> Vec<String> {
    let mut docs: Vec<String> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    let mut all = vec!["README.md".to_string()];
    all.extend(docs);
    all
}

// ------------------------------------------------------------------ pages

/// One fenced block of a page.
struct Block {
    /// Line of the opening fence (1-based).
    line: usize,
    lang: String,
    /// (line, text without the fence's indentation).
    body: Vec<(usize, String)>,
    /// Why it is not run, when marked so.
    not_run: Option<String>,
}

fn blocks(page: &str) -> Result<Vec<Block>, String> {
    let text = std::fs::read_to_string(root().join(page)).map_err(|e| format!("{page}: {e}"))?;
    let mut out = Vec::new();
    let mut open: Option<(Block, usize)> = None;
    let mut marker: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let t = raw.trim_start();
        let indent = raw.len() - t.len();
        if let Some((b, ind)) = open.as_mut() {
            if t.trim_end() == "```" {
                out.push(open.take().expect("open").0);
            } else {
                let body = match raw.get(..*ind) {
                    Some(p) if p.trim().is_empty() => &raw[*ind..],
                    _ => t,
                };
                b.body.push((n, body.to_string()));
            }
            continue;
        }
        if let Some(rest) = t.strip_prefix(NOT_RUN) {
            let reason = rest.trim_end().trim_end_matches("-->").trim();
            if reason.is_empty() {
                return Err(format!("{page}:{n}: a not-run marker needs a reason"));
            }
            marker = Some((n, reason.to_string()));
            continue;
        }
        if let Some(lang) = t.strip_prefix("```") {
            let lang = lang.trim().to_string();
            let not_run = match marker.take() {
                Some((_, reason)) if is_shell(&lang) => Some(reason),
                Some((m, _)) => {
                    return Err(format!(
                        "{page}:{m}: a not-run marker must stand right before a ```sh block"
                    ))
                }
                None => None,
            };
            open = Some((
                Block {
                    line: n,
                    lang,
                    body: Vec::new(),
                    not_run,
                },
                indent,
            ));
            continue;
        }
        if let Some((m, _)) = &marker {
            if !t.is_empty() {
                return Err(format!(
                    "{page}:{m}: a not-run marker must stand right before a ```sh block"
                ));
            }
        }
    }
    if let Some((b, _)) = open {
        return Err(format!("{page}:{}: unclosed code block", b.line));
    }
    if let Some((m, _)) = marker {
        return Err(format!(
            "{page}:{m}: a not-run marker at the end of the page"
        ));
    }
    Ok(out)
}

/// One command of a block: `\`-continued lines joined, comments apart.
struct Cmd {
    line: usize,
    /// The command's lines as written, without comments (and without the
    /// trailing `&` of a background command).
    code: Vec<String>,
    comment: String,
    background: bool,
}

impl Cmd {
    fn text(&self) -> String {
        self.code.join("\n")
    }
}

fn commands(b: &Block) -> Vec<Cmd> {
    let mut out = Vec::new();
    let mut cur: Option<Cmd> = None;
    for (n, raw) in &b.body {
        let t = raw.trim();
        if cur.is_none() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        let (code, comment) = split_comment(raw);
        let c = cur.get_or_insert_with(|| Cmd {
            line: *n,
            code: Vec::new(),
            comment: String::new(),
            background: false,
        });
        if !comment.is_empty() {
            if !c.comment.is_empty() {
                c.comment.push(' ');
            }
            c.comment.push_str(comment);
        }
        let code = code.trim_end();
        if code.ends_with('\\') {
            c.code.push(code.to_string());
            continue;
        }
        let mut c = cur.take().expect("a command");
        match code.strip_suffix('&') {
            Some(rest) if !rest.ends_with('&') => {
                c.background = true;
                c.code.push(rest.trim_end().to_string());
            }
            _ => c.code.push(code.to_string()),
        }
        out.push(c);
    }
    out.extend(cur);
    out
}

/// Splits a shell line at its comment: a `#` that starts a word outside quotes.
fn split_comment(line: &str) -> (&str, &str) {
    let b = line.as_bytes();
    let (mut single, mut double) = (false, false);
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if !single => i += 1,
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b'#' if !single && !double && (i == 0 || b[i - 1] == b' ' || b[i - 1] == b'\t') => {
                return (&line[..i], line[i + 1..].trim());
            }
            _ => {}
        }
        i += 1;
    }
    (line, "")
}

/// What a command must do, from its comment.
#[derive(Debug, Default, PartialEq)]
struct Expect {
    exit: i32,
    stderr: Option<String>,
    stdout: Option<Vec<String>>,
    prints_something: bool,
    until_stopped: bool,
}

fn expect(comment: &str) -> Expect {
    let mut e = Expect::default();
    if let Some(rest) = comment.strip_prefix("exit ") {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        e.exit = digits.parse().unwrap_or(-1);
        if let Some(text) = rest[digits.len()..].strip_prefix(": \"") {
            e.stderr = Some(text.split('"').next().unwrap_or("").to_string());
        }
    }
    e.until_stopped = comment.contains("runs until stopped");
    if let Some(i) = comment.find("prints") {
        let literals: Vec<String> = comment[i..]
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        if literals.is_empty() {
            e.prints_something = true;
        } else {
            e.stdout = Some(literals);
        }
    }
    e
}

fn stand_in(c: &Cmd) -> Option<&'static str> {
    let text = c.text();
    STAND_INS
        .iter()
        .find(|(line, _)| *line == text.trim())
        .map(|(_, why)| *why)
}

// ------------------------------------------------------------ static checks

/// The workspace's packages with their binaries, examples and tests.
struct Package {
    name: String,
    bins: Vec<String>,
    examples: Vec<String>,
    tests: Vec<String>,
}

fn stems(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "rs") || p.join("main.rs").exists() {
                Some(p.file_stem()?.to_string_lossy().into_owned())
            } else {
                None
            }
        })
        .collect()
}

/// `name = "..."` values of a Cargo.toml, by the section they are in.
fn toml_names(text: &str, section: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut inside = false;
    for l in text.lines().map(str::trim) {
        if l.starts_with('[') {
            inside = l == section;
            continue;
        }
        if inside {
            if let Some(v) = l.strip_prefix("name") {
                if let Some(v) = v.trim_start().strip_prefix('=') {
                    names.push(v.trim().trim_matches('"').to_string());
                }
            }
        }
    }
    names
}

fn workspace() -> Vec<Package> {
    let root = root();
    let top = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let members = top
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("workspace members");
    members
        .split('"')
        .skip(1)
        .step_by(2)
        .map(|m| {
            let dir = root.join(m);
            let text =
                std::fs::read_to_string(dir.join("Cargo.toml")).expect("a member's Cargo.toml");
            let name = toml_names(&text, "[package]")
                .into_iter()
                .next()
                .expect("a package name");
            let mut bins = toml_names(&text, "[[bin]]");
            if bins.is_empty() && dir.join("src/main.rs").exists() {
                bins.push(name.clone());
            }
            bins.extend(stems(&dir.join("src/bin")));
            Package {
                name,
                bins,
                examples: stems(&dir.join("examples")),
                tests: stems(&dir.join("tests")),
            }
        })
        .collect()
}

/// What a command names that must exist: packages, binaries, examples,
/// tests, repository paths. Returns what does not.
fn check_names(cmd: &str, ws: &[Package]) -> Vec<String> {
    let root = root();
    let top_dirs: BTreeSet<String> = std::fs::read_dir(&root)
        .expect("the root")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "target" && n != ".git")
        .collect();
    let words: Vec<&str> = cmd
        .split_whitespace()
        .map(|w| w.trim_matches(|c| c == '\'' || c == '"'))
        .collect();
    let mut bad = Vec::new();
    let any = |f: &dyn Fn(&Package) -> bool| ws.iter().any(f);
    if let Some(start) = words.iter().position(|w| *w == "cargo") {
        let mut pkg: Option<&Package> = None;
        let args = &words[start..];
        for (i, w) in args.iter().enumerate() {
            let Some(v) = args.get(i + 1).copied() else {
                break;
            };
            match *w {
                "-p" | "--package" => match ws.iter().find(|p| p.name == v) {
                    Some(p) => pkg = Some(p),
                    None => bad.push(format!("no package {v:?} in the workspace")),
                },
                "--bin" | "--example" | "--test" => {
                    let has = |p: &Package| match *w {
                        "--bin" => p.bins.iter().any(|b| b == v),
                        "--example" => p.examples.iter().any(|b| b == v),
                        _ => p.tests.iter().any(|b| b == v),
                    };
                    let found = match pkg {
                        Some(p) => has(p),
                        None => any(&has),
                    };
                    if !found {
                        bad.push(format!("no {} {v:?}", &w[2..]));
                    }
                }
                _ => {}
            }
        }
    }
    for w in &words {
        // `NAME=value` sets a variable; the value may name a path.
        let w = match w.split_once('=') {
            Some((k, v))
                if !k.is_empty() && k.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') =>
            {
                v
            }
            _ => w,
        };
        for profile in ["target/release/", "target/debug/"] {
            if let Some(rest) = w.strip_prefix(profile) {
                if let Some(ex) = rest.strip_prefix("examples/") {
                    if !any(&|p: &Package| p.examples.iter().any(|e| e == ex)) {
                        bad.push(format!("no example {ex:?} (in {w})"));
                    }
                } else if !rest.is_empty()
                    && !rest.contains('/')
                    && !any(&|p: &Package| p.bins.iter().any(|b| b == rest))
                {
                    bad.push(format!("no binary {rest:?} (in {w})"));
                }
            }
        }
        if w.contains('/')
            && !w.contains("://")
            && !w.starts_with(['-', '.', '/', '$', '~', '<', '@'])
        {
            let first = w.split('/').next().unwrap_or("");
            if top_dirs.contains(first) && !root.join(w.trim_end_matches('/')).exists() {
                bad.push(format!("no file {w:?} in the repository"));
            }
        }
    }
    bad
}

// ------------------------------------------------------------------ running

struct Broker {
    native: String,
    http: String,
    stop: CancellationToken,
    _data: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn broker() -> Broker {
    let data = tempfile::tempdir().expect("a data directory");
    let cfg = Config {
        listen: "127.0.0.1:0".parse().expect("an address"),
        data_dir: data.path().to_path_buf(),
        node_id: "doc-test".into(),
        ..Config::default()
    };
    let server = Server::bind(cfg).await.expect("the broker binds");
    let http = HttpServer::bind("127.0.0.1:0".parse().expect("an address"), server.state())
        .await
        .expect("the HTTP gateway binds");
    let b = Broker {
        native: server.local_addr().to_string(),
        http: http.local_addr().to_string(),
        stop: CancellationToken::new(),
        _data: data,
    };
    tokio::spawn(server.run(b.stop.clone()));
    tokio::spawn(http.run(b.stop.clone()));
    b
}

/// A command's text as the test runs it: the test broker's addresses.
fn rewrite(code: &str, b: &Broker) -> String {
    code.replace("127.0.0.1:7420", &b.native)
        .replace("127.0.0.1:7480", &b.http)
}

fn bash(script: &Path, cwd: &Path, b: &Broker) -> Command {
    let bin = Path::new(env!("CARGO_BIN_EXE_sockbus"))
        .parent()
        .expect("the binary's directory");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("bash");
    c.arg(script)
        .current_dir(cwd)
        .env("PATH", path)
        .env("SOCKBUS_URL", format!("sockbus://{}", b.native))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .process_group(0);
    c
}

/// Signals a child's whole process group (the child leads it).
fn signal_group(child: &Child, sig: &str) {
    let _ = Command::new("bash")
        .args(["-c", &format!("kill -{sig} -- -{} 2>/dev/null", child.id())])
        .status();
}

/// Waits for a child until `deadline`; kills its group then. True if it ended in time.
async fn wait_until(mut child: Child, deadline: Instant) -> bool {
    tokio::task::spawn_blocking(move || loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            signal_group(&child, "KILL");
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    })
    .await
    .expect("the waiter")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn clip(s: &str) -> String {
    const MAX: usize = 1500;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// Where one command's status and output go.
fn outputs(dir: &Path, n: usize) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join(format!("{n}.rc")),
        dir.join(format!("{n}.out")),
        dir.join(format!("{n}.err")),
    )
}

/// Compares what a command did with what its comment promises.
fn judge(c: &Cmd, page: &str, dir: &Path, n: usize, failures: &mut Vec<String>) {
    let e = expect(&c.comment);
    let (rc, out, err) = outputs(dir, n);
    let (out, err) = (read(&out), read(&err));
    let mut wrong = Vec::new();
    match read(&rc).trim().parse::<i32>() {
        Err(_) => wrong.push("did not finish".to_string()),
        Ok(code) if code != e.exit => {
            wrong.push(format!("exit status {code}, the doc says {}", e.exit))
        }
        Ok(_) => {}
    }
    if let Some(want) = &e.stderr {
        if !err.contains(want.as_str()) {
            wrong.push(format!("stderr lacks {want:?}"));
        }
    }
    if let Some(want) = &e.stdout {
        let got: Vec<&str> = out.lines().collect();
        if got != *want {
            wrong.push(format!("stdout is {got:?}, the doc says {want:?}"));
        }
    }
    if e.prints_something && out.trim().is_empty() {
        wrong.push("printed nothing, the doc says it prints".to_string());
    }
    if !wrong.is_empty() {
        failures.push(format!(
            "{page}:{}: `{}`: {}\n  stdout: {}\n  stderr: {}",
            c.line,
            c.text(),
            wrong.join("; "),
            clip(&out),
            clip(&err)
        ));
    }
}

/// Runs every runnable command of one page against a fresh broker.
async fn run_page(page: &str, blocks: &[Block], failures: &mut Vec<String>) {
    let b = broker().await;
    let cwd = tempfile::tempdir().expect("a working directory");
    let work = tempfile::tempdir().expect("a directory for outputs");
    for (name, content) in FIXTURES {
        std::fs::write(cwd.path().join(name), content).expect("a fixture");
    }
    let deadline = Instant::now() + PAGE_DEADLINE;

    // Commands that run until stopped start first, so they see what the
    // page's other commands publish.
    let mut running = Vec::new();
    for (i, blk) in blocks.iter().enumerate() {
        if !is_shell(&blk.lang) || blk.not_run.is_some() {
            continue;
        }
        for (j, c) in commands(blk).iter().enumerate() {
            if !expect(&c.comment).until_stopped {
                continue;
            }
            let want = match blocks.get(i + 1) {
                Some(next) if next.lang == "text" => Some(next),
                _ => None,
            };
            let script = work.path().join(format!("long-{i}-{j}.sh"));
            let out = work.path().join(format!("long-{i}-{j}.out"));
            std::fs::write(
                &script,
                format!(
                    "curl() {{ command curl --fail-with-body \"$@\"; }}\n{}\n",
                    rewrite(&c.text(), &b)
                ),
            )
            .expect("a script");
            let child = bash(&script, cwd.path(), &b)
                .stdout(std::fs::File::create(&out).expect("an output file"))
                .stderr(Stdio::null())
                .spawn()
                .expect("bash runs");
            // Wait until it is listening (it said something), or give up after 5 s.
            let until = Instant::now() + Duration::from_secs(5);
            while read(&out).is_empty() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            running.push((c.line, c.text(), child, out, want));
        }
    }

    for (i, blk) in blocks.iter().enumerate() {
        if !is_shell(&blk.lang) || blk.not_run.is_some() {
            continue;
        }
        let dir = work.path().join(format!("block-{i}"));
        std::fs::create_dir(&dir).expect("a block directory");
        let mut script = String::from("curl() { command curl --fail-with-body \"$@\"; }\n");
        let mut judged = Vec::new();
        for (n, c) in commands(blk).into_iter().enumerate() {
            if stand_in(&c).is_some() || expect(&c.comment).until_stopped {
                continue;
            }
            if c.code
                .first()
                .is_some_and(|l| l.trim_start().starts_with("cargo "))
            {
                failures.push(format!(
                    "{page}:{}: `{}`: this test never runs cargo; add the line to STAND_INS \
                     in client/tests/doc_commands.rs with what stands in for it, or mark \
                     its block not run",
                    c.line,
                    c.text()
                ));
                continue;
            }
            let (rc, out, err) = outputs(&dir, n);
            let code = rewrite(&c.text(), &b);
            if c.background {
                let _ = writeln!(
                    script,
                    "(\n{code}\necho $? >'{}'\n) >'{}' 2>'{}' </dev/null &",
                    rc.display(),
                    out.display(),
                    err.display()
                );
            } else {
                let _ = writeln!(
                    script,
                    "{{\n{code}\n}} >'{}' 2>'{}' </dev/null\necho $? >'{}'",
                    out.display(),
                    err.display(),
                    rc.display()
                );
            }
            judged.push((n, c));
        }
        if judged.is_empty() {
            continue;
        }
        script.push_str("wait\n");
        let path = dir.join("block.sh");
        std::fs::write(&path, &script).expect("a script");
        let child = bash(&path, cwd.path(), &b)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bash runs");
        if !wait_until(child, deadline).await {
            failures.push(format!(
                "{page}:{}: the block did not finish within {PAGE_DEADLINE:?}",
                blk.line
            ));
        }
        for (n, c) in &judged {
            judge(c, page, &dir, *n, failures);
        }
    }

    // Let the last messages reach whoever runs until stopped, then stop them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (line, text, mut child, out, want) in running {
        signal_group(&child, "TERM");
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        let got = read(&out);
        let Some(want) = want else { continue };
        let want: String = want.body.iter().map(|(_, l)| format!("{l}\n")).collect();
        if got.trim_end() != want.trim_end() {
            failures.push(format!(
                "{page}:{line}: `{text}` printed\n{}\nbut the ```text block after it shows\n{}",
                clip(&got),
                want
            ));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_in_readme_and_docs_run_as_documented() {
    for tool in ["bash", "curl"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "the doc commands need `{tool}` on PATH (apt-get install {tool}; .ci/run installs it)"
        );
    }
    let ws = workspace();
    let mut failures = Vec::new();
    for page in pages() {
        let blocks = match blocks(&page) {
            Ok(b) => b,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let mut run = 0;
        for blk in blocks.iter().filter(|b| is_shell(&b.lang)) {
            for c in commands(blk) {
                for bad in check_names(&c.text(), &ws) {
                    failures.push(format!("{page}:{}: `{}`: {bad}", c.line, c.text()));
                }
                if let Some(why) = stand_in(&c) {
                    eprintln!("{page}:{}: not run: `{}`: {why}", c.line, c.text());
                } else if blk.not_run.is_none() {
                    run += 1;
                }
            }
            if let Some(why) = &blk.not_run {
                eprintln!("{page}:{}: block not run: {why}", blk.line);
            }
        }
        if run > 0 {
            eprintln!("{page}: running {run} commands");
            run_page(&page, &blocks, &mut failures).await;
        }
    }
    assert!(
        failures.is_empty(),
        "{} doc command(s) do not do what the docs say:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn the_example_config_files_in_docs_are_accepted_by_the_broker() {
    let dir = tempfile::tempdir().expect("a directory");
    let mut seen = 0;
    for page in pages() {
        for b in blocks(&page).expect("a readable page") {
            if b.lang != "toml" {
                continue;
            }
            seen += 1;
            let path = dir.path().join("sockbus.toml");
            let text: String = b.body.iter().map(|(_, l)| format!("{l}\n")).collect();
            std::fs::write(&path, text).expect("a file");
            let r = Options {
                config: Some(path),
                ..Default::default()
            }
            .resolve();
            if let Err(e) = r {
                panic!("{page}:{}: the broker refuses this config: {e:#}", b.line);
            }
        }
    }
    assert!(seen > 0, "docs/operations.md shows an example config file");
}

#[test]
fn comments_say_what_a_command_must_do() {
    assert_eq!(expect("a one-shot service"), Expect::default());
    assert_eq!(
        expect(r#"exit 1: "sockbus: no responders""#),
        Expect {
            exit: 1,
            stderr: Some("sockbus: no responders".into()),
            ..Default::default()
        }
    );
    assert_eq!(
        expect("prints `{\"id\": 1}` and `{\"id\": 2}`, each on its own line").stdout,
        Some(vec!["{\"id\": 1}".into(), "{\"id\": 2}".into()])
    );
    assert!(expect("prints the reply").prints_something);
    assert!(expect("runs until stopped").until_stopped);
    assert_eq!(
        split_comment("echo '#x' \"a # b\" x#y # note"),
        ("echo '#x' \"a # b\" x#y ", "note")
    );
}

#[test]
fn commands_join_continued_lines_and_know_background_jobs() {
    let b = Block {
        line: 1,
        lang: "sh".into(),
        body: [
            "# a comment line",
            "sockbus sub 'a.>' --count 2 &   # prints `x`",
            "curl -X POST \\",
            "     http://127.0.0.1:7480/v1/publish/a",
            "true && true",
        ]
        .iter()
        .enumerate()
        .map(|(i, l)| (i + 2, l.to_string()))
        .collect(),
        not_run: None,
    };
    let cs = commands(&b);
    assert_eq!(cs.len(), 3);
    assert!(cs[0].background);
    assert_eq!(cs[0].text(), "sockbus sub 'a.>' --count 2");
    assert_eq!(cs[0].comment, "prints `x`");
    assert_eq!(cs[1].line, 4);
    assert_eq!(cs[1].code.len(), 2);
    assert!(!cs[2].background);
}

#[test]
fn named_packages_binaries_examples_and_paths_must_exist() {
    let ws = workspace();
    assert!(check_names(
        "cargo build --release -p sockbus-broker --bin sockbus-broker --example accel_bench",
        &ws
    )
    .is_empty());
    assert!(check_names(
        "LOADTEST_BIN=target/release/sockbus-loadtest bash loadtest/hey/run.sh http://x/y",
        &ws
    )
    .is_empty());
    assert_eq!(
        check_names("cargo run -p sockbus-brokr", &ws),
        ["no package \"sockbus-brokr\" in the workspace"]
    );
    assert_eq!(
        check_names("target/release/examples/no_such_bench --rounds 3", &ws).len(),
        1
    );
    assert_eq!(check_names("bash k8s/no-such-script.sh", &ws).len(), 1);
}
