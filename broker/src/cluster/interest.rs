//! What this broker's peers must hear from it: one route subscription per
//! distinct (pattern, queue group) of local interest, however many local
//! subscriptions share it, kept current on every route link as subscriptions
//! come and go (fed by the router's [`InterestHook`]), plus the choice
//! between two links to the same peer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use sockbus_protocol::frame::{encode_sub, encode_unsub};

use crate::outlet::Outlet;
use crate::router::InterestHook;

/// (pattern, queue group) of local subscriptions.
type Key = (Box<str>, Option<Box<str>>);

#[derive(Default)]
pub(crate) struct PeerInterest {
    inner: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    /// Route subscription id and how many local subscriptions share the key.
    keys: HashMap<Key, (u32, usize)>,
    next_rsid: u32,
    links: Vec<Link>,
}

struct Link {
    out: Arc<Outlet>,
    peer: Box<str>,
    dialed_by_us: bool,
}

/// Why a route link was not registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkRefused {
    /// A route to that peer is up and wins the tie-break: the one dialed by
    /// the node with the smaller id is kept, so both ends keep the same one.
    Duplicate,
}

impl PeerInterest {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a route link and queues a SUB for every piece of local
    /// interest on it; later changes are queued as they happen. Done under
    /// one lock so no change can fall between snapshot and registration.
    ///
    /// Keeps one link per peer: when both nodes dialed each other, the link
    /// dialed by the node with the smaller id (`us` vs `peer`) wins on both
    /// ends; a losing existing link is aborted, a losing new one refused.
    pub fn add_link(
        &self,
        out: Arc<Outlet>,
        us: &str,
        peer: &str,
        dialed_by_us: bool,
    ) -> Result<(), LinkRefused> {
        let mut t = self.table();
        let wins = |dialed_by_us: bool| dialed_by_us == (us < peer);
        if let Some(pos) = t.links.iter().position(|l| &*l.peer == peer) {
            if !wins(dialed_by_us) || wins(t.links[pos].dialed_by_us) {
                return Err(LinkRefused::Duplicate);
            }
            let old = t.links.swap_remove(pos);
            old.out.abort.cancel();
        }
        for ((pattern, queue), (rsid, _)) in &t.keys {
            out.control(|b| {
                let _ = encode_sub(b, *rsid, pattern, queue.as_deref());
            });
        }
        t.links.push(Link {
            out,
            peer: peer.into(),
            dialed_by_us,
        });
        Ok(())
    }

    pub fn remove_link(&self, id: u64) {
        self.table().links.retain(|l| l.out.id != id);
    }

    /// Node ids of the peers with a route up.
    pub fn peers(&self) -> Vec<String> {
        self.table()
            .links
            .iter()
            .map(|l| l.peer.to_string())
            .collect()
    }
}

impl InterestHook for PeerInterest {
    fn added(&self, pattern: &str, queue: Option<&str>) {
        let mut t = self.table();
        let key = (Box::<str>::from(pattern), queue.map(Box::<str>::from));
        if let Some(e) = t.keys.get_mut(&key) {
            e.1 += 1;
            return;
        }
        t.next_rsid = t.next_rsid.wrapping_add(1);
        let rsid = t.next_rsid;
        t.keys.insert(key, (rsid, 1));
        for l in &t.links {
            l.out.control(|b| {
                let _ = encode_sub(b, rsid, pattern, queue);
            });
        }
    }

    fn removed(&self, pattern: &str, queue: Option<&str>) {
        let mut t = self.table();
        let key = (Box::<str>::from(pattern), queue.map(Box::<str>::from));
        let Some(e) = t.keys.get_mut(&key) else {
            return;
        };
        e.1 -= 1;
        if e.1 > 0 {
            return;
        }
        let rsid = e.0;
        t.keys.remove(&key);
        for l in &t.links {
            l.out.control(|b| encode_unsub(b, rsid, 0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{Router, Subscription};
    use sockbus_protocol::outbox::Outbox;
    use sockbus_protocol::{frame, FrameRef};
    use tokio_util::sync::CancellationToken;

    fn outlet(id: u64) -> Arc<Outlet> {
        Arc::new(Outlet::new(
            id,
            Outbox::new(1 << 20, 1 << 20),
            CancellationToken::new(),
            None,
        ))
    }

    /// What a link has been told, as (SUB|UNSUB, rsid, pattern, queue).
    fn told(link: &Outlet) -> Vec<(String, u32, String, Option<String>)> {
        let t = link.outbox.take();
        let mut data = &t.data[..];
        let mut out = Vec::new();
        while let Ok(Some((f, len))) = frame::decode(data, u32::MAX) {
            data = &data[len..];
            match f {
                FrameRef::Sub {
                    sid,
                    subject,
                    queue,
                } => out.push(("SUB".into(), sid, subject.into(), queue.map(Into::into))),
                FrameRef::Unsub { sid, .. } => out.push(("UNSUB".into(), sid, String::new(), None)),
                other => panic!("unexpected frame {other:?}"),
            }
        }
        out
    }

    #[test]
    fn peers_hear_each_pattern_once_however_many_subscribers_share_it() {
        let pi = Arc::new(PeerInterest::default());
        let router = Router::new(Some(pi.clone()));
        let link = outlet(100);
        pi.add_link(link.clone(), "a", "b", true).unwrap();
        let subs: Vec<_> = (0..3)
            .map(|i| {
                let s = Arc::new(Subscription::new(1, "orders.>", None, outlet(i)));
                router.insert(s.clone());
                s
            })
            .collect();
        let q = Arc::new(Subscription::new(2, "orders.>", Some("workers"), outlet(9)));
        router.insert(q.clone());
        let first = told(&link);
        assert_eq!(first.len(), 2, "one SUB per (pattern, queue): {first:?}");
        assert_eq!(first[0].2, "orders.>");
        assert_eq!(first[1].3.as_deref(), Some("workers"));

        // The interest stays while any local subscription holds it.
        router.remove(&subs[0]);
        router.remove(&subs[1]);
        assert!(told(&link).is_empty());
        router.remove(&subs[2]);
        let gone = told(&link);
        assert_eq!(
            gone,
            vec![("UNSUB".into(), first[0].1, String::new(), None)]
        );
    }

    #[test]
    fn a_peers_own_interest_is_never_announced_back_to_peers() {
        let pi = Arc::new(PeerInterest::default());
        let router = Router::new(Some(pi.clone()));
        let link = outlet(100);
        pi.add_link(link.clone(), "a", "b", true).unwrap();
        let remote = Arc::new(Subscription::new_peer(7, "x.>", None, link.clone()));
        router.insert(remote.clone());
        router.remove(&remote);
        assert!(told(&link).is_empty());
    }

    #[test]
    fn a_new_link_hears_all_interest_that_came_before_it() {
        let pi = Arc::new(PeerInterest::default());
        let router = Router::new(Some(pi.clone()));
        for (i, p) in ["a.*", "b.>", "c"].iter().enumerate() {
            router.insert(Arc::new(Subscription::new(1, p, None, outlet(i as u64))));
        }
        let link = outlet(100);
        pi.add_link(link.clone(), "a", "b", true).unwrap();
        let mut patterns: Vec<String> = told(&link).into_iter().map(|t| t.2).collect();
        patterns.sort();
        assert_eq!(patterns, ["a.*", "b.>", "c"]);
        assert_eq!(pi.peers(), ["b"]);
        pi.remove_link(100);
        assert!(pi.peers().is_empty());
    }

    #[test]
    fn both_ends_keep_the_link_dialed_by_the_smaller_node_id() {
        // On node "a" (the smaller id): its own dialed link wins.
        let pi = PeerInterest::default();
        let accepted = outlet(1);
        pi.add_link(accepted.clone(), "a", "b", false).unwrap();
        let dialed = outlet(2);
        pi.add_link(dialed.clone(), "a", "b", true).unwrap();
        assert!(accepted.abort.is_cancelled(), "the losing link is closed");
        assert_eq!(pi.peers(), ["b"]);
        // A second accepted link from b loses against a's dialed one.
        assert_eq!(
            pi.add_link(outlet(3), "a", "b", false),
            Err(LinkRefused::Duplicate)
        );

        // On node "b": the link a dialed (accepted here) wins over b's own.
        let pi = PeerInterest::default();
        pi.add_link(outlet(4), "b", "a", false).unwrap();
        assert_eq!(
            pi.add_link(outlet(5), "b", "a", true),
            Err(LinkRefused::Duplicate)
        );
    }
}
