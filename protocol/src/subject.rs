//! Subject validation and matching, with the same rules as NATS:
//! tokens separated by `.`, `*` matches exactly one token, `>` matches one or
//! more trailing tokens and may only stand last. A token is a wildcard only
//! when it is exactly `*` or `>`: `foo*`, `*bar` and `>-` are literal tokens,
//! valid in publish subjects and patterns alike, as nats-server has them.

use thiserror::Error;

/// Longest subject or pattern accepted, in bytes.
pub const MAX_SUBJECT_LEN: usize = 4096;

/// Prefix of the one-time reply subjects clients make for requests
/// (`_INBOX.<client>.<request>`): each is used once, so the broker caches
/// their routes per client, not per subject, and does not track them per
/// subject.
pub const INBOX_PREFIX: &str = "_INBOX.";

/// Is `subject` (or pattern) under `_INBOX.`, where requests' replies go?
/// Streams never capture these (docs/storage.md, "Capture").
#[inline]
pub fn is_inbox(subject: &str) -> bool {
    subject.starts_with(INBOX_PREFIX)
}

/// Why a subject or pattern was refused. The text is meant for the user.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubjectError {
    #[error("subject is empty")]
    Empty,
    #[error("subject is longer than {MAX_SUBJECT_LEN} bytes")]
    TooLong,
    #[error("subject {0:?} has an empty token (leading, trailing or doubled '.')")]
    EmptyToken(String),
    #[error("subject {0:?} contains whitespace or a control character")]
    BadCharacter(String),
    #[error(
        "subject {0:?} contains a wildcard token ('*' or '>'); publish subjects must be literal"
    )]
    WildcardInPublish(String),
    #[error("subject {0:?}: '>' may only stand as the last token")]
    GreaterNotLast(String),
}

fn check_common(s: &str) -> Result<(), SubjectError> {
    if s.is_empty() {
        return Err(SubjectError::Empty);
    }
    if s.len() > MAX_SUBJECT_LEN {
        return Err(SubjectError::TooLong);
    }
    if s.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(SubjectError::BadCharacter(s.to_string()));
    }
    Ok(())
}

/// Validates a subject a message is published to: literal tokens only.
pub fn validate_subject(s: &str) -> Result<(), SubjectError> {
    // One pass over the bytes for the common, valid case (this runs on every
    // publish in the SDK); the detailed checks below only name the error.
    let b = s.as_bytes();
    if !b.is_empty()
        && b.len() <= MAX_SUBJECT_LEN
        && b[0] != b'.'
        && b[b.len() - 1] != b'.'
        && !b.windows(2).any(|w| w[0] == b'.' && w[1] == b'.')
        && b.iter()
            .all(|&c| c > b' ' && c != 0x7f && c != b'*' && c != b'>')
    {
        return Ok(());
    }
    check_common(s)?;
    for tok in s.split('.') {
        if tok.is_empty() {
            return Err(SubjectError::EmptyToken(s.to_string()));
        }
        // Only a whole `*` or `>` token is a wildcard; `foo*` is literal.
        if tok == "*" || tok == ">" {
            return Err(SubjectError::WildcardInPublish(s.to_string()));
        }
    }
    Ok(())
}

/// Validates a subscription pattern: literal tokens, `*` tokens, and an optional final `>`.
pub fn validate_pattern(s: &str) -> Result<(), SubjectError> {
    check_common(s)?;
    let mut toks = s.split('.').peekable();
    while let Some(tok) = toks.next() {
        if tok.is_empty() {
            return Err(SubjectError::EmptyToken(s.to_string()));
        }
        // `*`, and any token that is not exactly a wildcard, is fine
        // anywhere; `foo*` and `>-` are literal tokens.
        if tok == ">" && toks.peek().is_some() {
            return Err(SubjectError::GreaterNotLast(s.to_string()));
        }
    }
    Ok(())
}

/// True when the pattern has a wildcard token.
pub fn is_wildcard(pattern: &str) -> bool {
    pattern.split('.').any(|t| t == "*" || t == ">")
}

/// Does `pattern` (validated) match the literal `subject` (validated)?
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(pt), Some(st)) if pt == st => {}
            _ => return false,
        }
    }
}

/// FNV-1a 32-bit hash of a subject; carried in the frame header so a kernel
/// program can route by topic without parsing the body.
pub fn subject_hash(subject: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in subject {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_subjects_are_accepted_and_wildcards_refused_for_publish() {
        assert!(validate_subject("orders.eu.created").is_ok());
        assert!(validate_subject("a").is_ok());
        assert_eq!(validate_subject(""), Err(SubjectError::Empty));
        assert!(matches!(
            validate_subject("a..b"),
            Err(SubjectError::EmptyToken(_))
        ));
        assert!(matches!(
            validate_subject(".a"),
            Err(SubjectError::EmptyToken(_))
        ));
        assert!(matches!(
            validate_subject("a."),
            Err(SubjectError::EmptyToken(_))
        ));
        assert!(matches!(
            validate_subject("a b"),
            Err(SubjectError::BadCharacter(_))
        ));
        assert!(matches!(
            validate_subject("a\tb"),
            Err(SubjectError::BadCharacter(_))
        ));
        assert!(matches!(
            validate_subject("a.*"),
            Err(SubjectError::WildcardInPublish(_))
        ));
        assert!(matches!(
            validate_subject("a.>"),
            Err(SubjectError::WildcardInPublish(_))
        ));
    }

    #[test]
    fn patterns_follow_nats_rules() {
        assert!(validate_pattern("a.*.c").is_ok());
        assert!(validate_pattern("a.>").is_ok());
        assert!(validate_pattern(">").is_ok());
        assert!(validate_pattern("*").is_ok());
        assert!(matches!(
            validate_pattern("a.>.c"),
            Err(SubjectError::GreaterNotLast(_))
        ));
        assert!(matches!(
            validate_pattern(">.a"),
            Err(SubjectError::GreaterNotLast(_))
        ));
        assert!(matches!(
            validate_pattern("a..*"),
            Err(SubjectError::EmptyToken(_))
        ));
    }

    #[test]
    fn matching_semantics() {
        assert!(matches("a.b.c", "a.b.c"));
        assert!(!matches("a.b.c", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("a.*.c", "a.x.c"));
        assert!(!matches("a.*.c", "a.x.y.c"));
        assert!(matches("a.>", "a.b"));
        assert!(matches("a.>", "a.b.c.d"));
        assert!(!matches("a.>", "a"));
        assert!(matches(">", "anything.at.all"));
        assert!(matches("*", "one"));
        assert!(!matches("*", "one.two"));
    }

    /// Cases after nats-server's sublist tests (TestSublistValidLiteralSubjects,
    /// TestSublistValidSubjects, TestSublistMatchLiterals): a token is a
    /// wildcard only when it is exactly `*` or `>`.
    #[test]
    fn partial_wildcards_are_literal_tokens_as_in_nats() {
        for lit in [
            "foo*", "*bar", "foo.*bar", "foo.bar*", ">-", "foo.>-", "foo.a>b", "*>", "**", ">>",
        ] {
            assert_eq!(validate_subject(lit), Ok(()), "publish {lit}");
            assert_eq!(validate_pattern(lit), Ok(()), "pattern {lit}");
            assert!(!is_wildcard(lit), "{lit}");
        }
        for wild in ["*", ">", "foo.*", "foo.>", "*.bar", "foo.*.bar"] {
            assert!(validate_subject(wild).is_err(), "publish {wild}");
            assert_eq!(validate_pattern(wild), Ok(()), "pattern {wild}");
        }
        for bad in [
            "foo.>.bar",
            ">.foo",
            "foo..bar",
            ".foo",
            "foo.",
            "foo bar",
            "foo\tbar",
        ] {
            assert!(validate_pattern(bad).is_err(), "pattern {bad}");
        }
        // Literal tokens with wildcard characters match only themselves.
        assert!(matches("foo.*", "foo.*bar"));
        assert!(matches("foo.>", "foo.bar*.baz"));
        assert!(matches("foo.*bar", "foo.*bar"));
        assert!(!matches("foo.*bar", "foo.xbar"));
        assert!(!matches("foo.bar*", "foo.bar"));
        assert!(!matches("foo.bar*", "foo.barbaz"));
        assert!(matches(">-", ">-"));
        assert!(!matches(">-", "anything"));
        assert!(matches("*", ">-"));
        assert!(matches("foo.*", "foo.>>"));
    }
}
