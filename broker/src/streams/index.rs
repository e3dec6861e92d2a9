//! Every stream's subject patterns in a token tree, so the two questions
//! asked of them cost a walk over one subject's tokens instead of a match
//! against every stream: which stream captures a subject (publish path,
//! behind the capture caches), and which stream's pattern a new one would
//! overlap (stream create). With 10,000 streams a scan of all of them per
//! create made creating them quadratic.

use std::collections::HashMap;

/// A pattern and the stream it belongs to.
type Entry = (Box<str>, Box<str>);

#[derive(Default)]
pub(super) struct PatternIndex {
    root: Node,
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// Patterns that end here.
    here: Vec<Entry>,
}

impl PatternIndex {
    pub fn insert(&mut self, pattern: &str, stream: &str) {
        let mut n = &mut self.root;
        for t in pattern.split('.') {
            n = n.children.entry(t.into()).or_default();
        }
        n.here.push((pattern.into(), stream.into()));
    }

    pub fn remove(&mut self, pattern: &str, stream: &str) {
        let toks: Vec<&str> = pattern.split('.').collect();
        remove_at(&mut self.root, &toks, stream);
    }

    /// The stream whose pattern matches the literal `subject` (stream
    /// patterns never overlap, so there is at most one).
    pub fn capture(&self, subject: &str) -> Option<&str> {
        let toks: Vec<&str> = subject.split('.').collect();
        capture_at(&self.root, &toks).map(|(_, s)| &**s)
    }

    /// A stored pattern, and its stream, that some subject matches along
    /// with `pattern`.
    pub fn overlap(&self, pattern: &str) -> Option<(&str, &str)> {
        let toks: Vec<&str> = pattern.split('.').collect();
        overlap_at(&self.root, &toks).map(|(p, s)| (&**p, &**s))
    }
}

/// Removes the entry; true when the node is left empty (and is dropped).
fn remove_at(n: &mut Node, toks: &[&str], stream: &str) -> bool {
    match toks.split_first() {
        None => n.here.retain(|(_, s)| &**s != stream),
        Some((t, rest)) => {
            if let Some(c) = n.children.get_mut(*t) {
                if remove_at(c, rest, stream) {
                    n.children.remove(*t);
                }
            }
        }
    }
    n.here.is_empty() && n.children.is_empty()
}

/// A `>` child matches one or more remaining tokens: it always ends a pattern.
fn tail(n: &Node) -> Option<&Entry> {
    n.children.get(">").and_then(|c| c.here.first())
}

fn capture_at<'a>(n: &'a Node, toks: &[&str]) -> Option<&'a Entry> {
    let Some((t, rest)) = toks.split_first() else {
        return n.here.first();
    };
    tail(n)
        .or_else(|| n.children.get(*t).and_then(|c| capture_at(c, rest)))
        .or_else(|| n.children.get("*").and_then(|c| capture_at(c, rest)))
}

fn overlap_at<'a>(n: &'a Node, q: &[&str]) -> Option<&'a Entry> {
    let Some((t, rest)) = q.split_first() else {
        return n.here.first();
    };
    if let Some(e) = tail(n) {
        return Some(e);
    }
    match *t {
        // Any stored pattern with at least one more token.
        ">" => any_below(n),
        "*" => n.children.values().find_map(|c| overlap_at(c, rest)),
        lit => n
            .children
            .get(lit)
            .and_then(|c| overlap_at(c, rest))
            .or_else(|| n.children.get("*").and_then(|c| overlap_at(c, rest))),
    }
}

fn any_below(n: &Node) -> Option<&Entry> {
    n.children
        .values()
        .find_map(|c| c.here.first().or_else(|| any_below(c)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::streams::patterns_overlap;

    #[test]
    fn a_subject_is_captured_by_the_stream_whose_pattern_matches_it() {
        let mut ix = PatternIndex::default();
        ix.insert("orders.>", "ORDERS");
        ix.insert("*.eu.audit", "AUDIT");
        ix.insert("metrics", "METRICS");
        assert_eq!(ix.capture("orders.eu"), Some("ORDERS"));
        assert_eq!(ix.capture("orders.eu.paid"), Some("ORDERS"));
        assert_eq!(ix.capture("orders"), None, "`>` needs a token");
        assert_eq!(ix.capture("x.eu.audit"), Some("AUDIT"));
        assert_eq!(ix.capture("x.us.audit"), None);
        assert_eq!(ix.capture("metrics"), Some("METRICS"));
        assert_eq!(ix.capture("metrics.cpu"), None);
        ix.remove("orders.>", "ORDERS");
        assert_eq!(ix.capture("orders.eu"), None);
        assert_eq!(ix.capture("x.eu.audit"), Some("AUDIT"));
        ix.remove("*.eu.audit", "AUDIT");
        ix.remove("metrics", "METRICS");
        assert!(ix.root.children.is_empty(), "emptied nodes are dropped");
    }

    #[test]
    fn an_overlap_names_the_pattern_and_stream_it_overlaps() {
        let mut ix = PatternIndex::default();
        ix.insert("orders.*", "ORDERS");
        assert_eq!(ix.overlap("orders.eu"), Some(("orders.*", "ORDERS")));
        assert_eq!(ix.overlap(">"), Some(("orders.*", "ORDERS")));
        assert_eq!(ix.overlap("orders.eu.paid"), None);
        assert_eq!(ix.overlap("orders"), None);
    }

    fn pattern() -> impl Strategy<Value = String> {
        let tok = prop_oneof![Just("a"), Just("b"), Just("*"), Just(">")];
        proptest::collection::vec(tok, 1..4).prop_map(|v| {
            // `>` only stands last.
            let mut v: Vec<&str> = v;
            for i in 0..v.len().saturating_sub(1) {
                if v[i] == ">" {
                    v[i] = "*";
                }
            }
            v.join(".")
        })
    }

    fn subject() -> impl Strategy<Value = String> {
        let tok = prop_oneof![Just("a"), Just("b"), Just("c")];
        proptest::collection::vec(tok, 1..5).prop_map(|v| v.join("."))
    }

    proptest! {
        #[test]
        fn the_index_agrees_with_matching_every_pattern(
            stored in proptest::collection::vec(pattern(), 0..8),
            q in pattern(),
            subj in subject(),
        ) {
            let mut ix = PatternIndex::default();
            for (i, p) in stored.iter().enumerate() {
                ix.insert(p, &format!("S{i}"));
            }
            let overlaps = stored.iter().any(|p| patterns_overlap(p, &q));
            prop_assert_eq!(ix.overlap(&q).is_some(), overlaps);
            if let Some((p, _)) = ix.overlap(&q) {
                prop_assert!(patterns_overlap(p, &q));
            }
            let matching = stored.iter().any(|p| sockbus_protocol::matches(p, &subj));
            prop_assert_eq!(ix.capture(&subj).is_some(), matching);
            if let Some(s) = ix.capture(&subj) {
                let i: usize = s[1..].parse().unwrap();
                prop_assert!(sockbus_protocol::matches(&stored[i], &subj));
            }
        }
    }
}
