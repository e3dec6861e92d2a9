//! A replica whose files are damaged repairs from its peers (docs/storage.md,
//! "Damage on a replica").
//!
//! Before a group's Raft starts, its stream's sealed segments are checked
//! (CRC) and compared with what the state machine says was applied. Damage
//! there (a record failing its CRC, a segment cut short, fewer records than
//! applied) empties this replica's copy: messages, durable consumers, state
//! machine and Raft log; the vote and term stay. The leader then sends it
//! the log again, or a snapshot when its log is purged. Damage in the Raft
//! log itself cuts the log there (log.rs) and the leader sends the rest.
//!
//! Either way the replica may have acknowledged entries it no longer holds:
//! it neither votes nor campaigns until it has applied up to the last index
//! it knew of (`target`), so it cannot help elect a leader lacking them. The
//! `raft/repair` marker keeps that across restarts; with `wipe` set, the
//! emptying is redone after a crash midway.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::log::LogStore;
use super::sm;
use crate::streams::{write_atomic, Stream};

const MARKER: &str = "repair";

/// `raft/repair`: this replica is being repaired.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct Marker {
    /// It votes again once it has applied the entry at this index.
    pub target: u64,
    /// Its copy of the stream is still to be emptied.
    pub wipe: bool,
    /// What was found, for the logs.
    pub reason: String,
}

fn read_marker(dir: &Path) -> Option<Marker> {
    let b = std::fs::read(dir.join(MARKER)).ok()?;
    match serde_json::from_slice(&b) {
        Ok(m) => Some(m),
        Err(e) => {
            // Only this code writes it (atomically): unreadable means the
            // disk damaged it too. Repair everything to be sure.
            warn!(path = %dir.join(MARKER).display(), "unreadable repair marker: {e}");
            Some(Marker {
                target: 0,
                wipe: true,
                reason: "unreadable repair marker".into(),
            })
        }
    }
}

fn write_marker(dir: &Path, m: &Marker) -> io::Result<()> {
    let b = serde_json::to_vec(m).map_err(io::Error::other)?;
    write_atomic(&dir.join(MARKER), &b)
}

pub(crate) fn remove_marker(dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(dir.join(MARKER)) {
        Ok(()) => crate::store::segment::sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// What is wrong with the stream's copy here, if anything. Checks every
/// sealed segment's CRCs (blocking: run before the group starts).
fn stream_damage(s: &Stream, dir: &Path) -> Option<String> {
    if sm::install_pending(dir) {
        // The state machine installs the snapshot again whole.
        return None;
    }
    s.log.verify_sealed();
    let (lost, next) = {
        let st = s.log.lock();
        (st.lost, st.next_seq)
    };
    let (claimed, _) = sm::claimed(dir);
    if lost > 0 {
        Some(format!(
            "{lost} records of the stream's segments damaged or cut off (CRC)"
        ))
    } else if next < claimed {
        Some(format!(
            "the stream's segments end at sequence {} but entries up to sequence {} were applied (a segment cut short)",
            next - 1,
            claimed - 1
        ))
    } else {
        None
    }
}

/// Checks a replicated stream's copy here (every sealed segment's CRCs,
/// against what was applied) and empties it when damaged, with its Raft
/// log. Run when the stream opens at start-up, before anything is served,
/// and again before its group starts. Blocking.
pub(crate) fn check_stream(s: &Arc<Stream>, dir: &Path, fsync: bool) -> io::Result<()> {
    let mut marker = read_marker(dir);
    let known = marker.as_ref().map_or(0, |m| m.target);
    if !marker.as_ref().is_some_and(|m| m.wipe) {
        if let Some(reason) = stream_damage(s, dir) {
            let (_, applied) = sm::claimed(dir);
            let m = Marker {
                target: applied.max(known),
                wipe: true,
                reason,
            };
            write_marker(dir, &m)?;
            marker = Some(m);
        }
    }
    let Some(mut m) = marker.filter(|m| m.wipe) else {
        return Ok(());
    };
    // Whatever this replica's log held, it may have acknowledged.
    let (store, damage) = LogStore::open(dir, fsync)?;
    m.target = m
        .target
        .max(store.last_index())
        .max(damage.map_or(0, |d| d.last_seen));
    write_marker(dir, &m)?;
    error!(stream = %s.name, reason = %m.reason, target = m.target,
        "damaged replica: its copy of the stream is emptied and repaired from its peers; \
         it neither votes nor campaigns until it has applied entry {} again", m.target);
    sm::wipe(s, dir)?;
    store.clear()?;
    m.wipe = false;
    write_marker(dir, &m)
}

/// Run before the group's Raft starts: checks the stream's copy again,
/// opens the group's log. Returns the log and, while this replica is being
/// repaired, its marker.
pub(crate) fn prepare(
    s: &Arc<Stream>,
    dir: &Path,
    fsync: bool,
) -> io::Result<(LogStore, Option<Marker>)> {
    check_stream(s, dir, fsync)?;
    let (store, log_damage) = LogStore::open(dir, fsync)?;
    let mut marker = read_marker(dir);
    if let Some(d) = log_damage {
        let reason = format!(
            "Raft log damaged (CRC) from entry {}, whole entries up to {} after it",
            d.first_lost, d.last_seen
        );
        let m = match marker {
            Some(mut m) => {
                m.target = m.target.max(d.last_seen);
                m.reason = format!("{}; {reason}", m.reason);
                m
            }
            None => Marker {
                target: d.last_seen,
                wipe: false,
                reason,
            },
        };
        write_marker(dir, &m)?;
        marker = Some(m);
    }
    Ok((store, marker))
}

/// Waits until the repairing replica has applied its marker's target (and
/// knows a leader), then lets it vote and campaign again.
pub(crate) async fn watch(name: String, g: Arc<super::Group>, dir: std::path::PathBuf, m: Marker) {
    let started = Instant::now();
    let mut rx = g.raft.metrics();
    loop {
        let done = {
            let x = rx.borrow();
            x.current_leader.is_some() && x.last_applied.map_or(0, |l| l.index) >= m.target
        };
        if done {
            break;
        }
        if rx.changed().await.is_err() {
            // The group stopped; the marker stays for the next start.
            return;
        }
    }
    if let Err(e) = remove_marker(&dir) {
        error!(stream = %name, "cannot remove the repair marker: {e}");
        return;
    }
    g.repaired();
    let stats = super::hub()
        .state()
        .and_then(|st| st.streams.get(&name))
        .map(|s| {
            let st = s.log.lock();
            (st.msgs(), st.first_seq(), st.last_seq())
        });
    let (msgs, first, last) = stats.unwrap_or_default();
    info!(stream = %name, reason = %m.reason, applied_to = m.target, messages = msgs,
        first_seq = first, last_seq = last, took = ?started.elapsed(),
        "damaged replica repaired from its peers: it votes again");
    super::hub().count_repair(&name);
}
