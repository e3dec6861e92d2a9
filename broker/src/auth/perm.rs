//! Publish and subscribe permissions: allow and deny lists of subject
//! patterns. Deny wins; an absent allow list allows everything.
//!
//! A publish subject is literal, so it is allowed when no deny pattern
//! matches it and, if there is an allow list, one allow pattern does. A
//! subscription is a pattern: it is allowed when an allow pattern covers
//! every subject it can match, and refused when it can match any subject a
//! deny pattern matches (so with a deny list, `>` is refused: the broker
//! never filters messages at delivery, which would cost every message).

/// One direction's rule (publish or subscribe).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// None: everything not denied.
    pub allow: Option<Vec<String>>,
    pub deny: Vec<String>,
}

impl Rule {
    /// Whether this rule allows everything (no allow list, no deny list).
    pub fn is_open(&self) -> bool {
        self.allow.is_none() && self.deny.is_empty()
    }

    /// May publish to this literal subject.
    pub fn allows_subject(&self, subject: &str) -> bool {
        if self.deny.iter().any(|d| matches(d, subject)) {
            return false;
        }
        match &self.allow {
            None => true,
            Some(a) => a.iter().any(|p| matches(p, subject)),
        }
    }

    /// May subscribe to this pattern.
    pub fn allows_pattern(&self, pattern: &str) -> bool {
        if self.deny.iter().any(|d| overlaps(d, pattern)) {
            return false;
        }
        match &self.allow {
            None => true,
            Some(a) => a.iter().any(|p| covers(p, pattern)),
        }
    }
}

/// A user's permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Rule,
    pub subscribe: Rule,
}

/// `pattern` matches the literal `subject`.
pub fn matches(pattern: &str, subject: &str) -> bool {
    sockbus_protocol::matches(pattern, subject)
}

/// Every subject `inner` matches, `outer` matches too.
pub fn covers(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('.');
    let mut i = inner.split('.');
    loop {
        match (o.next(), i.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b && a != "*" && a != ">" => {}
            _ => return false,
        }
    }
}

/// Some subject is matched by both `a` and `b`.
pub fn overlaps(a: &str, b: &str) -> bool {
    let mut x = a.split('.');
    let mut y = b.split('.');
    loop {
        match (x.next(), y.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(p), Some(q)) if p == q => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(allow: Option<&[&str]>, deny: &[&str]) -> Rule {
        Rule {
            allow: allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn deny_wins_over_allow_and_no_allow_list_allows_everything() {
        let r = rule(Some(&["orders.>"]), &["orders.admin.>"]);
        assert!(r.allows_subject("orders.new"));
        assert!(!r.allows_subject("orders.admin.x"));
        assert!(!r.allows_subject("billing.x"));
        assert!(r.allows_pattern("orders.*"));
        assert!(!r.allows_pattern("orders.>"), "overlaps the deny list");
        assert!(!r.allows_pattern(">"));
        let open = rule(None, &[]);
        assert!(open.allows_subject("anything.at.all") && open.allows_pattern(">"));
        let deny_only = rule(None, &["secret.>"]);
        assert!(deny_only.allows_subject("public"));
        assert!(!deny_only.allows_subject("secret.x"));
        assert!(!deny_only.allows_pattern("*.x"));
    }

    // The reference: a subject is a list of tokens from a small alphabet;
    // patterns are compared by every subject of that alphabet up to a length
    // longer than any pattern, so `>` has room to span.
    const ALPHABET: [&str; 3] = ["a", "b", "c"];
    const MAX_LEN: usize = 5;

    fn ref_matches(p: &[&str], s: &[&str]) -> bool {
        match (p.split_first(), s.split_first()) {
            (None, None) => true,
            (Some((&">", _)), Some(_)) => true,
            (Some((&"*", pr)), Some((_, sr))) => ref_matches(pr, sr),
            (Some((t, pr)), Some((u, sr))) => t == u && ref_matches(pr, sr),
            _ => false,
        }
    }

    fn universe() -> Vec<Vec<&'static str>> {
        let mut all = vec![];
        let mut layer: Vec<Vec<&str>> = vec![vec![]];
        for _ in 0..MAX_LEN {
            layer = layer
                .iter()
                .flat_map(|s| {
                    ALPHABET.iter().map(move |t| {
                        let mut v = s.clone();
                        v.push(*t);
                        v
                    })
                })
                .collect();
            all.extend(layer.iter().cloned());
        }
        all
    }

    fn ref_allows_subject(allow: &Option<Vec<String>>, deny: &[String], s: &[&str]) -> bool {
        let m = |p: &String| ref_matches(&p.split('.').collect::<Vec<_>>(), s);
        !deny.iter().any(m) && allow.as_ref().is_none_or(|a| a.iter().any(m))
    }

    fn pattern() -> impl Strategy<Value = String> {
        // `a`, `b` literal (`c` stands for every other token), `*`, and `>` last.
        (
            prop::collection::vec(prop::sample::select(vec!["a", "b", "*"]), 1..4),
            any::<bool>(),
        )
            .prop_map(|(mut t, tail)| {
                if tail {
                    t.push(">");
                }
                t.join(".")
            })
    }

    proptest! {
        #[test]
        fn the_publish_check_agrees_with_the_reference(
            allow in prop::option::of(prop::collection::vec(pattern(), 0..4)),
            deny in prop::collection::vec(pattern(), 0..3),
        ) {
            let r = Rule { allow: allow.clone(), deny: deny.clone() };
            for s in universe() {
                prop_assert_eq!(
                    r.allows_subject(&s.join(".")),
                    ref_allows_subject(&allow, &deny, &s),
                    "subject {}", s.join(".")
                );
            }
        }

        #[test]
        fn covers_and_overlaps_agree_with_the_reference(a in pattern(), b in pattern()) {
            let (pa, pb): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
            let u = universe();
            let want_covers = u.iter().all(|s| !ref_matches(&pb, s) || ref_matches(&pa, s));
            let want_overlaps = u.iter().any(|s| ref_matches(&pa, s) && ref_matches(&pb, s));
            prop_assert_eq!(covers(&a, &b), want_covers, "covers({}, {})", a, b);
            prop_assert_eq!(overlaps(&a, &b), want_overlaps, "overlaps({}, {})", a, b);
        }

        #[test]
        fn a_subscription_allowed_only_receives_subjects_its_user_may_receive(
            allow in prop::option::of(prop::collection::vec(pattern(), 0..4)),
            deny in prop::collection::vec(pattern(), 0..3),
            sub in pattern(),
        ) {
            let r = Rule { allow: allow.clone(), deny: deny.clone() };
            if r.allows_pattern(&sub) {
                let ps: Vec<&str> = sub.split('.').collect();
                for s in universe().iter().filter(|s| ref_matches(&ps, s)) {
                    prop_assert!(ref_allows_subject(&allow, &deny, s), "{} gets {}", sub, s.join("."));
                }
            }
        }
    }
}
