//! Every `$SB.` subject, named once (as nats-server's jetstream_api.go names
//! each JetStream subject once): the SDK builds them with the functions
//! here, the broker dispatches with [`Api::parse`] and [`parse_ack`].
//!
//! | subject | body | reply |
//! |---|---|---|
//! | `$SB.API.STREAM.CREATE.<stream>` | StreamConfig | StreamInfo |
//! | `$SB.API.STREAM.INFO.<stream>` | - | StreamInfo |
//! | `$SB.API.STREAM.UPDATE.<stream>` | StreamConfig | StreamInfo |
//! | `$SB.API.STREAM.PURGE.<stream>` | PurgeRequest | Purged |
//! | `$SB.API.STREAM.DELETE.<stream>` | - | Deleted |
//! | `$SB.API.STREAM.LIST` | - | StreamList |
//! | `$SB.API.CONSUMER.CREATE.<stream>` | ConsumerConfig | ConsumerInfo |
//! | `$SB.API.CONSUMER.INFO.<stream>.<consumer>` | - | ConsumerInfo |
//! | `$SB.API.CONSUMER.DELETE.<stream>.<consumer>` | - | Deleted |
//! | `$SB.API.CONSUMER.LIST.<stream>` | - | ConsumerList |
//! | `$SB.API.CONSUMER.NEXT.<stream>.<consumer>` | PullRequest | messages to the reply subject |
//! | `$SB.ACK.<stream>.<consumer>.<seq>.<deliveries>` | an [`AckKind`](super::AckKind) body | `{"ok":true}` once stored, if a reply subject is given |
//!
//! Builders put names in as given. A name is one token (see
//! [`validate_name`](super::validate_name)): one holding a `.` turns into
//! extra tokens and so parses as no API subject at all, and one holding a
//! wildcard or whitespace makes a subject that publish validation refuses
//! before it is sent.

use std::fmt;

/// Prefix reserved for the broker on every front end: a publish to it is
/// answered by the broker and never routed to subscribers.
pub const RESERVED_PREFIX: &str = "$SB.";
/// Prefix of the stream and consumer management requests.
pub const API_PREFIX: &str = "$SB.API.";
/// Prefix of the reply subjects of delivered stream messages.
pub const ACK_PREFIX: &str = "$SB.ACK.";
/// Lists every stream.
pub const STREAM_LIST: &str = "$SB.API.STREAM.LIST";

/// Is this subject the broker's own (`$SB.…`)?
#[inline]
pub fn is_reserved(subject: &str) -> bool {
    subject.starts_with(RESERVED_PREFIX)
}

/// One API request subject, parsed: what to do, to which stream and consumer.
/// `Display` writes the subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api<'a> {
    StreamCreate {
        stream: &'a str,
    },
    StreamInfo {
        stream: &'a str,
    },
    StreamDelete {
        stream: &'a str,
    },
    /// Changes an existing stream's configuration.
    StreamUpdate {
        stream: &'a str,
    },
    /// Removes messages from a stream.
    StreamPurge {
        stream: &'a str,
    },
    StreamList,
    /// Replaces one replica of a replicated stream by another node.
    StreamReplacePeer {
        stream: &'a str,
    },
    ConsumerCreate {
        stream: &'a str,
    },
    ConsumerInfo {
        stream: &'a str,
        consumer: &'a str,
    },
    ConsumerDelete {
        stream: &'a str,
        consumer: &'a str,
    },
    ConsumerList {
        stream: &'a str,
    },
    ConsumerNext {
        stream: &'a str,
        consumer: &'a str,
    },
}

impl<'a> Api<'a> {
    /// The request a subject names, or `None` when it is no API subject
    /// (wrong prefix, unknown verb, or a different number of tokens, as a
    /// name holding a `.` gives). Names are taken as they stand: whether
    /// such a stream exists is for the caller to say.
    pub fn parse(subject: &'a str) -> Option<Api<'a>> {
        let rest = subject.strip_prefix(API_PREFIX)?;
        let mut t = rest.split('.');
        let toks = [t.next(), t.next(), t.next(), t.next()];
        if t.next().is_some() {
            return None;
        }
        Some(match toks {
            [Some("STREAM"), Some("CREATE"), Some(stream), None] => Api::StreamCreate { stream },
            [Some("STREAM"), Some("INFO"), Some(stream), None] => Api::StreamInfo { stream },
            [Some("STREAM"), Some("DELETE"), Some(stream), None] => Api::StreamDelete { stream },
            [Some("STREAM"), Some("UPDATE"), Some(stream), None] => Api::StreamUpdate { stream },
            [Some("STREAM"), Some("PURGE"), Some(stream), None] => Api::StreamPurge { stream },
            [Some("STREAM"), Some("LIST"), None, None] => Api::StreamList,
            [Some("STREAM"), Some("REPLACE_PEER"), Some(stream), None] => {
                Api::StreamReplacePeer { stream }
            }
            [Some("CONSUMER"), Some("CREATE"), Some(stream), None] => {
                Api::ConsumerCreate { stream }
            }
            [Some("CONSUMER"), Some("INFO"), Some(stream), Some(consumer)] => {
                Api::ConsumerInfo { stream, consumer }
            }
            [Some("CONSUMER"), Some("DELETE"), Some(stream), Some(consumer)] => {
                Api::ConsumerDelete { stream, consumer }
            }
            [Some("CONSUMER"), Some("LIST"), Some(stream), None] => Api::ConsumerList { stream },
            [Some("CONSUMER"), Some("NEXT"), Some(stream), Some(consumer)] => {
                Api::ConsumerNext { stream, consumer }
            }
            _ => return None,
        })
    }
}

impl fmt::Display for Api<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(API_PREFIX)?;
        match self {
            Api::StreamCreate { stream } => write!(f, "STREAM.CREATE.{stream}"),
            Api::StreamInfo { stream } => write!(f, "STREAM.INFO.{stream}"),
            Api::StreamDelete { stream } => write!(f, "STREAM.DELETE.{stream}"),
            Api::StreamUpdate { stream } => write!(f, "STREAM.UPDATE.{stream}"),
            Api::StreamPurge { stream } => write!(f, "STREAM.PURGE.{stream}"),
            Api::StreamList => f.write_str("STREAM.LIST"),
            Api::StreamReplacePeer { stream } => write!(f, "STREAM.REPLACE_PEER.{stream}"),
            Api::ConsumerCreate { stream } => write!(f, "CONSUMER.CREATE.{stream}"),
            Api::ConsumerInfo { stream, consumer } => {
                write!(f, "CONSUMER.INFO.{stream}.{consumer}")
            }
            Api::ConsumerDelete { stream, consumer } => {
                write!(f, "CONSUMER.DELETE.{stream}.{consumer}")
            }
            Api::ConsumerList { stream } => write!(f, "CONSUMER.LIST.{stream}"),
            Api::ConsumerNext { stream, consumer } => {
                write!(f, "CONSUMER.NEXT.{stream}.{consumer}")
            }
        }
    }
}

/// `$SB.API.STREAM.CREATE.<stream>`
pub fn stream_create(stream: &str) -> String {
    Api::StreamCreate { stream }.to_string()
}

/// `$SB.API.STREAM.INFO.<stream>`
pub fn stream_info(stream: &str) -> String {
    Api::StreamInfo { stream }.to_string()
}

/// `$SB.API.STREAM.REPLACE_PEER.<stream>`
pub fn stream_replace_peer(stream: &str) -> String {
    Api::StreamReplacePeer { stream }.to_string()
}

/// `$SB.API.STREAM.DELETE.<stream>`
pub fn stream_delete(stream: &str) -> String {
    Api::StreamDelete { stream }.to_string()
}

/// `$SB.API.STREAM.UPDATE.<stream>`
pub fn stream_update(stream: &str) -> String {
    Api::StreamUpdate { stream }.to_string()
}

/// `$SB.API.STREAM.PURGE.<stream>`
pub fn stream_purge(stream: &str) -> String {
    Api::StreamPurge { stream }.to_string()
}

/// `$SB.API.CONSUMER.CREATE.<stream>`
pub fn consumer_create(stream: &str) -> String {
    Api::ConsumerCreate { stream }.to_string()
}

/// `$SB.API.CONSUMER.INFO.<stream>.<consumer>`
pub fn consumer_info(stream: &str, consumer: &str) -> String {
    Api::ConsumerInfo { stream, consumer }.to_string()
}

/// `$SB.API.CONSUMER.DELETE.<stream>.<consumer>`
pub fn consumer_delete(stream: &str, consumer: &str) -> String {
    Api::ConsumerDelete { stream, consumer }.to_string()
}

/// `$SB.API.CONSUMER.LIST.<stream>`
pub fn consumer_list(stream: &str) -> String {
    Api::ConsumerList { stream }.to_string()
}

/// `$SB.API.CONSUMER.NEXT.<stream>.<consumer>`
pub fn consumer_next(stream: &str, consumer: &str) -> String {
    Api::ConsumerNext { stream, consumer }.to_string()
}

/// The reply subject of a delivered stream message, parsed.
/// `Display` writes `$SB.ACK.<stream>.<consumer>.<seq>.<deliveries>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack<'a> {
    pub stream: &'a str,
    pub consumer: &'a str,
    pub seq: u64,
    /// 1 for a first delivery.
    pub deliveries: u32,
}

impl fmt::Display for Ack<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Ack {
            stream,
            consumer,
            seq,
            deliveries,
        } = self;
        write!(f, "{ACK_PREFIX}{stream}.{consumer}.{seq}.{deliveries}")
    }
}

/// `$SB.ACK.<stream>.<consumer>.<seq>.<deliveries>`
pub fn ack(stream: &str, consumer: &str, seq: u64, deliveries: u32) -> String {
    Ack {
        stream,
        consumer,
        seq,
        deliveries,
    }
    .to_string()
}

/// Reads an ack subject: `None` unless it has a stream, a consumer and a
/// numeric sequence. The broker needs only those; the delivery count is
/// informational, 1 when missing or not a number, and tokens after it are
/// ignored (as the broker always has).
pub fn parse_ack(subject: &str) -> Option<Ack<'_>> {
    let mut t = subject.strip_prefix(ACK_PREFIX)?.split('.');
    let stream = t.next()?;
    let consumer = t.next()?;
    let seq = t.next()?.parse().ok()?;
    let deliveries = t.next().and_then(|d| d.parse().ok()).unwrap_or(1);
    Some(Ack {
        stream,
        consumer,
        seq,
        deliveries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subject::{validate_subject, SubjectError};
    use proptest::prelude::*;

    #[test]
    fn builders_write_the_documented_subjects() {
        assert_eq!(stream_create("ORDERS"), "$SB.API.STREAM.CREATE.ORDERS");
        assert_eq!(stream_info("ORDERS"), "$SB.API.STREAM.INFO.ORDERS");
        assert_eq!(stream_delete("ORDERS"), "$SB.API.STREAM.DELETE.ORDERS");
        assert_eq!(stream_update("ORDERS"), "$SB.API.STREAM.UPDATE.ORDERS");
        assert_eq!(stream_purge("ORDERS"), "$SB.API.STREAM.PURGE.ORDERS");
        assert_eq!(Api::StreamList.to_string(), STREAM_LIST);
        assert_eq!(STREAM_LIST, "$SB.API.STREAM.LIST");
        assert_eq!(consumer_create("ORDERS"), "$SB.API.CONSUMER.CREATE.ORDERS");
        assert_eq!(
            consumer_info("ORDERS", "w"),
            "$SB.API.CONSUMER.INFO.ORDERS.w"
        );
        assert_eq!(
            consumer_delete("ORDERS", "w"),
            "$SB.API.CONSUMER.DELETE.ORDERS.w"
        );
        assert_eq!(consumer_list("ORDERS"), "$SB.API.CONSUMER.LIST.ORDERS");
        assert_eq!(
            consumer_next("ORDERS", "w"),
            "$SB.API.CONSUMER.NEXT.ORDERS.w"
        );
        assert_eq!(ack("ORDERS", "w", 42, 3), "$SB.ACK.ORDERS.w.42.3");
        for s in [stream_create("A"), ack("A", "b", 1, 1)] {
            assert!(is_reserved(&s));
            assert_eq!(validate_subject(&s), Ok(()));
        }
        assert!(!is_reserved("$SB"));
        assert!(!is_reserved("SB.API.STREAM.LIST"));
    }

    #[test]
    fn every_api_subject_parses_back_to_its_request() {
        let (stream, consumer) = ("ORDERS", "eph-00ff");
        for a in [
            Api::StreamCreate { stream },
            Api::StreamInfo { stream },
            Api::StreamDelete { stream },
            Api::StreamUpdate { stream },
            Api::StreamPurge { stream },
            Api::StreamList,
            Api::ConsumerCreate { stream },
            Api::ConsumerInfo { stream, consumer },
            Api::ConsumerDelete { stream, consumer },
            Api::ConsumerList { stream },
            Api::ConsumerNext { stream, consumer },
        ] {
            assert_eq!(Api::parse(&a.to_string()), Some(a), "{a}");
        }
    }

    #[test]
    fn other_subjects_are_no_api_request() {
        for s in [
            "",
            "$SB.API.",
            "$SB.API.STREAM",
            "$SB.API.STREAM.LIST.x",
            "$SB.API.STREAM.CREATE",
            "$SB.API.STREAM.SEAL.A",
            "$SB.API.CONSUMER.INFO.A",
            "$SB.API.CONSUMER.NEXT.A.b.c",
            "$SB.API.stream.info.A",
            "$SB.ACK.A.b.1.1",
            "SB.API.STREAM.INFO.A",
            "orders.eu",
        ] {
            assert_eq!(Api::parse(s), None, "{s:?}");
        }
    }

    #[test]
    fn a_name_with_a_dot_makes_no_api_subject() {
        let d = "a.b";
        for s in [
            stream_create(d),
            stream_info(d),
            stream_delete(d),
            consumer_create(d),
            consumer_list(d),
            consumer_info(d, "c"),
            consumer_info("s", d),
            consumer_delete(d, "c"),
            consumer_delete("s", d),
            consumer_next(d, "c"),
            consumer_next("s", d),
        ] {
            assert_eq!(Api::parse(&s), None, "{s}");
        }
    }

    #[test]
    fn a_name_with_a_wildcard_or_space_makes_a_subject_publish_refuses() {
        for n in ["*", ">", "a b"] {
            for s in [
                stream_create(n),
                stream_info(n),
                consumer_next("s", n),
                ack(n, "c", 1, 1),
            ] {
                assert!(
                    matches!(
                        validate_subject(&s),
                        Err(SubjectError::WildcardInPublish(_) | SubjectError::BadCharacter(_))
                    ),
                    "{s:?}"
                );
            }
        }
        // Empty names leave an empty token.
        assert!(validate_subject(&stream_info("")).is_err());
    }

    #[test]
    fn ack_subjects_need_stream_consumer_and_numeric_seq() {
        let a = Ack {
            stream: "ORDERS",
            consumer: "w",
            seq: 42,
            deliveries: 3,
        };
        assert_eq!(parse_ack(&a.to_string()), Some(a));
        // The delivery count is informational.
        assert_eq!(
            parse_ack("$SB.ACK.ORDERS.w.42"),
            Some(Ack { deliveries: 1, ..a })
        );
        assert_eq!(
            parse_ack("$SB.ACK.ORDERS.w.42.x"),
            Some(Ack { deliveries: 1, ..a })
        );
        assert_eq!(parse_ack("$SB.ACK.ORDERS.w.42.3.more"), Some(a));
        for bad in [
            "$SB.ACK.",
            "$SB.ACK.ORDERS",
            "$SB.ACK.ORDERS.w",
            "$SB.ACK.ORDERS.w.x.1",
            "$SB.ACK.ORDERS.w.-1.1",
            "$SB.API.STREAM.LIST",
            "ORDERS.w.42.3",
        ] {
            assert_eq!(parse_ack(bad), None, "{bad:?}");
        }
    }

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-]{1,64}"
    }

    proptest! {
        #[test]
        fn any_valid_names_round_trip_through_every_subject(
            s in name(), c in name(), seq in any::<u64>(), d in any::<u32>(),
        ) {
            let (stream, consumer) = (s.as_str(), c.as_str());
            for a in [
                Api::StreamCreate { stream },
                Api::StreamInfo { stream },
                Api::StreamDelete { stream },
                Api::ConsumerCreate { stream },
                Api::ConsumerInfo { stream, consumer },
                Api::ConsumerDelete { stream, consumer },
                Api::ConsumerList { stream },
                Api::ConsumerNext { stream, consumer },
            ] {
                let subject = a.to_string();
                prop_assert_eq!(validate_subject(&subject), Ok(()));
                prop_assert_eq!(Api::parse(&subject), Some(a));
            }
            let a = Ack { stream, consumer, seq, deliveries: d };
            let subject = ack(stream, consumer, seq, d);
            prop_assert_eq!(parse_ack(&subject), Some(a));
        }

        #[test]
        fn parsing_never_panics_and_what_parses_prints_back(
            subject in "(\\$SB\\.(API|ACK)\\.)?((STREAM|CONSUMER|CREATE|INFO|LIST|NEXT|[a-z0-9*> ]{0,3})\\.?){0,6}",
        ) {
            if let Some(a) = Api::parse(&subject) {
                prop_assert_eq!(a.to_string(), subject.as_str());
            }
            let _ = parse_ack(&subject);
        }
    }
}
