//! The checker: every acked message is stored exactly once, at the seq its
//! ack named, in the same order on every copy; no consumer saw a message
//! again after its ack was confirmed, and none skipped one.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::workload::{ConsLog, PubLog};
use crate::{Fault, Rng, ALL_FAULTS};

/// One copy of the stream: (seq, payload) in the order stored.
pub type Copy = Vec<(u64, String)>;

/// Evidence lines printed per kind of violation (all are counted).
const SHOW: usize = 20;

/// A stream directory read offline by `sockbus-broker verify-stream`: its
/// records, and a note of the damage it found, if any.
pub fn offline_copy(broker: &Path, dir: &Path) -> Result<(Copy, Option<String>)> {
    let out = Command::new(broker)
        .arg("verify-stream")
        .arg(dir)
        .arg("--records")
        .output()
        .context("cannot run sockbus-broker verify-stream")?;
    if !matches!(out.status.code(), Some(0 | 3)) {
        bail!(
            "verify-stream {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut recs = Vec::new();
    let mut note = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if let Some(seq) = v.get("seq").and_then(|s| s.as_u64()) {
            let p = v.get("payload").and_then(|p| p.as_str()).unwrap_or("");
            recs.push((seq, p.to_string()));
        } else if v.get("records").is_some() && out.status.code() == Some(3) {
            note = Some(format!("verify-stream found damage: {v}"));
        }
    }
    Ok((recs, note))
}

/// Flips a bit in, or truncates, one segment file of a stopped node.
pub fn corrupt(dir: &Path, rng: &mut Rng) -> Result<String> {
    let segs = sockbus_broker::offline::segment_files(dir)?;
    if segs.is_empty() {
        return Ok("no segment yet, nothing corrupted".into());
    }
    let (_, path) = &segs[rng.below(segs.len() as u64) as usize];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let bytes = std::fs::read(path)?;
    // Only the written part: zero-fill after it is not data.
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1) as u64;
    let name = path
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    if end <= 16 {
        return Ok(format!("{name} holds no record, nothing corrupted"));
    }
    if rng.below(2) == 0 {
        let off = 16 + rng.below(end - 16);
        let bit = 1u8 << rng.below(8);
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off)?;
        b[0] ^= bit;
        f.write_all_at(&b, off)?;
        f.sync_all()?;
        Ok(format!(
            "flipped bit {bit:#04x} at byte {off} of {name} ({end} bytes written)"
        ))
    } else {
        let len = 16 + rng.below(end - 16);
        f.set_len(len)?;
        f.sync_all()?;
        Ok(format!(
            "truncated {name} from {} to {len} bytes",
            bytes.len()
        ))
    }
}

#[derive(Default)]
pub struct Outcome {
    pub seed: u64,
    pub faults: Vec<(Fault, u64)>,
    pub acked: u64,
    pub unacked: u64,
    pub duplicates_acked: u64,
    pub attempts: u64,
    pub publish_errors: u64,
    pub deliveries: u64,
    pub copies: usize,
    pub checked: u64,
    pub damage: Vec<String>,
    pub violations: Vec<String>,
}

fn push(
    v: &mut Vec<String>,
    shown: &mut HashMap<&'static str, usize>,
    kind: &'static str,
    s: String,
) {
    let n = shown.entry(kind).or_default();
    *n += 1;
    if *n <= SHOW {
        v.push(format!("{kind}: {s}"));
    } else if *n == SHOW + 1 {
        v.push(format!("{kind}: ... (more of this kind, counted below)"));
    }
}

#[allow(clippy::too_many_arguments)]
pub fn check(
    seed: u64,
    faults: Vec<(Fault, u64)>,
    _events: Vec<String>,
    pubs: Vec<PubLog>,
    cons: Vec<ConsLog>,
    copies: Vec<(String, Vec<(u64, String)>)>,
    damage: Vec<String>,
    mut violations: Vec<String>,
) -> Outcome {
    let mut shown: HashMap<&'static str, usize> = HashMap::new();
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    let mut v = |kind: &'static str, s: String, violations: &mut Vec<String>| {
        *counts.entry(kind).or_default() += 1;
        push(violations, &mut shown, kind, s);
    };
    let acked: Vec<_> = pubs.iter().flat_map(|p| p.acked.iter()).collect();
    let sent: HashSet<&str> = pubs
        .iter()
        .flat_map(|p| {
            p.acked
                .iter()
                .map(|a| a.id.as_str())
                .chain(p.unacked.iter().map(|s| s.as_str()))
        })
        .collect();
    let mut out = Outcome {
        seed,
        faults,
        acked: acked.len() as u64,
        unacked: pubs.iter().map(|p| p.unacked.len() as u64).sum(),
        duplicates_acked: acked.iter().filter(|a| a.duplicate).count() as u64,
        attempts: pubs.iter().map(|p| p.attempts).sum(),
        publish_errors: pubs.iter().map(|p| p.errors).sum(),
        deliveries: cons.iter().map(|c| c.seen.len() as u64).sum(),
        copies: copies.len(),
        damage,
        ..Default::default()
    };
    // Publishers: each publishes one message at a time, so its acks must
    // carry increasing sequences, and no two acks may share a sequence.
    let mut by_seq: HashMap<u64, &str> = HashMap::new();
    for p in &pubs {
        for w in p.acked.windows(2) {
            if w[1].seq <= w[0].seq {
                v(
                    "acks out of order",
                    format!(
                        "{} acked at seq {} after {} at seq {}",
                        w[1].id, w[1].seq, w[0].id, w[0].seq
                    ),
                    &mut violations,
                );
            }
        }
        for a in &p.acked {
            if let Some(other) = by_seq.insert(a.seq, &a.id) {
                v(
                    "two acks, one seq",
                    format!("seq {} acked for {other} and for {}", a.seq, a.id),
                    &mut violations,
                );
            }
        }
    }
    // Every copy: acked ids exactly once, at their seq; nothing foreign.
    for (name, recs) in &copies {
        let mut where_: HashMap<&str, Vec<u64>> = HashMap::new();
        for w in recs.windows(2) {
            if w[1].0 <= w[0].0 {
                v(
                    "copy out of order",
                    format!("{name}: seq {} after seq {}", w[1].0, w[0].0),
                    &mut violations,
                );
            }
        }
        for (seq, id) in recs {
            where_.entry(id.as_str()).or_default().push(*seq);
            if !sent.contains(id.as_str()) {
                v(
                    "foreign bytes served",
                    format!("{name}: seq {seq} holds {id:?}, which no publisher sent"),
                    &mut violations,
                );
            }
        }
        for (id, seqs) in &where_ {
            if seqs.len() > 1 {
                v(
                    "stored twice",
                    format!("{name}: {id} at seqs {seqs:?}"),
                    &mut violations,
                );
            }
        }
        for a in &acked {
            out.checked += 1;
            match where_.get(a.id.as_str()) {
                None => v(
                    "acked message missing",
                    format!("{name}: {} (acked at seq {}) is not there", a.id, a.seq),
                    &mut violations,
                ),
                Some(s) if !s.contains(&a.seq) => v(
                    "acked message moved",
                    format!("{name}: {} acked at seq {} is at {s:?}", a.id, a.seq),
                    &mut violations,
                ),
                _ => {}
            }
        }
    }
    // One order: every copy holds the same records.
    if let Some((first, base)) = copies.first() {
        for (name, recs) in &copies[1..] {
            if recs != base {
                let i = recs
                    .iter()
                    .zip(base)
                    .position(|(a, b)| a != b)
                    .unwrap_or(recs.len().min(base.len()));
                v("copies differ", format!("{name} vs {first}: {} vs {} records, first difference at index {i}: {:?} vs {:?}", recs.len(), base.len(), recs.get(i), base.get(i)), &mut violations);
            }
        }
    }
    // Consumers: no redelivery after a confirmed ack (recorded as it
    // happened); every stored seq delivered.
    let stored: Vec<(u64, String)> = copies
        .iter()
        .find(|(n, _)| n.ends_with("(data dir)"))
        .or(copies.first())
        .map(|(_, r)| r.clone())
        .unwrap_or_default();
    for c in &cons {
        for s in &c.violations {
            v("redelivered after ack", s.clone(), &mut violations);
        }
        let seen: HashMap<u64, &str> = c.seen.iter().map(|(s, id, _)| (*s, id.as_str())).collect();
        for (seq, id) in &stored {
            match seen.get(seq) {
                None => v(
                    "skipped by consumer",
                    format!("consumer {} never got seq {seq} ({id})", c.name),
                    &mut violations,
                ),
                Some(got) if got != id => v(
                    "consumer saw other bytes",
                    format!(
                        "consumer {} got {got} at seq {seq}, the stream now holds {id}",
                        c.name
                    ),
                    &mut violations,
                ),
                _ => {}
            }
        }
        out.checked += c.seen.len() as u64;
    }
    let mut kinds: Vec<_> = counts.into_iter().collect();
    kinds.sort();
    if !kinds.is_empty() {
        violations.push(format!(
            "counts: {}",
            kinds
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out.violations = violations;
    out
}

impl Outcome {
    pub fn print(&self) {
        println!(
            "  acked {} (duplicate acks {}), unacked at the end {}, publish attempts {} (errors/timeouts {}), consumer deliveries {}, copies read {}, checks {}",
            self.acked, self.duplicates_acked, self.unacked, self.attempts, self.publish_errors, self.deliveries, self.copies, self.checked
        );
        for d in &self.damage {
            println!("  note: {d}");
        }
        if self.violations.is_empty() {
            println!("  OK: no violation");
        } else {
            println!("  VIOLATIONS (seed {}):", self.seed);
            for v in &self.violations {
                println!("    {v}");
            }
        }
    }

    pub fn json(&self, seed: u64, args: &crate::Args) -> serde_json::Value {
        serde_json::json!({
            "seed": seed, "nodes": args.nodes, "replicas": args.replicas,
            "duration_s": args.duration.as_secs(),
            "faults": self.faults.iter().map(|(f, n)| (f.name().to_string(), *n)).collect::<HashMap<_, _>>(),
            "acked": self.acked, "unacked": self.unacked, "deliveries": self.deliveries,
            "checks": self.checked, "violations": self.violations,
        })
    }
}

#[derive(Default)]
pub struct Totals {
    faults: HashMap<&'static str, u64>,
    acked: u64,
    checked: u64,
    violations: u64,
    bad_runs: u64,
}

impl Totals {
    pub fn add(&mut self, o: &Outcome) {
        for (f, n) in &o.faults {
            *self.faults.entry(f.name()).or_default() += n;
        }
        self.acked += o.acked;
        self.checked += o.checked;
        let n = o.violations.len() as u64;
        self.violations += n;
        self.bad_runs += (n > 0) as u64;
    }

    pub fn print(&self, runs: u64) {
        let f = ALL_FAULTS
            .iter()
            .filter_map(|f| {
                self.faults
                    .get(f.name())
                    .map(|n| format!("{} {n}", f.name()))
            })
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "== {runs} run(s); faults: {f}; acked messages {}; checks {}; runs with violations {}",
            self.acked, self.checked, self.bad_runs
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Acked;

    fn acked(id: &str, seq: u64) -> Acked {
        Acked {
            id: id.into(),
            seq,
            duplicate: false,
        }
    }

    fn run(copies: Vec<(String, Copy)>, cons: Vec<ConsLog>) -> Outcome {
        let pubs = vec![PubLog {
            acked: vec![acked("p0-1", 1), acked("p0-2", 2), acked("p0-3", 3)],
            ..Default::default()
        }];
        check(1, vec![], vec![], pubs, cons, copies, vec![], vec![])
    }

    fn copy(recs: &[(u64, &str)]) -> Copy {
        recs.iter().map(|(s, id)| (*s, id.to_string())).collect()
    }

    fn consumer(seen: &[(u64, &str)]) -> ConsLog {
        ConsLog {
            name: "c1".into(),
            seen: seen.iter().map(|(s, id)| (*s, id.to_string(), 1)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn an_intact_stream_and_a_complete_consumer_pass() {
        let all = [(1, "p0-1"), (2, "p0-2"), (3, "p0-3")];
        let o = run(vec![("n1".into(), copy(&all))], vec![consumer(&all)]);
        assert!(o.violations.is_empty(), "{:?}", o.violations);
        assert_eq!(o.checked, 6);
    }

    #[test]
    fn a_lost_a_duplicated_a_foreign_and_a_reused_record_are_each_reported() {
        let stored = copy(&[(1, "p0-1"), (3, "p0-3"), (4, "p0-3"), (5, "\u{fffd}x")]);
        let o = run(
            vec![
                ("n1 (data dir)".into(), stored.clone()),
                ("n2 (data dir)".into(), copy(&[(1, "p0-1")])),
            ],
            vec![consumer(&[(1, "p0-1"), (3, "p0-2")])],
        );
        let all = o.violations.join("\n");
        for want in [
            "acked message missing: n1 (data dir): p0-2 (acked at seq 2)",
            "stored twice: n1 (data dir): p0-3 at seqs [3, 4]",
            "foreign bytes served: n1 (data dir): seq 5",
            "copies differ: n2 (data dir) vs n1 (data dir)",
            "consumer saw other bytes: consumer c1 got p0-2 at seq 3",
            "skipped by consumer: consumer c1 never got seq 4",
        ] {
            assert!(all.contains(want), "{want:?} not in:\n{all}");
        }
    }
}
