//! Pull consumers: the configuration a consumer is created with (also its
//! `consumers/<name>.json` on the broker's disk), the pull request that asks
//! for a batch, what a consumer reports, and the kinds of ack.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{validate_name, ConfigError};
use crate::subject::validate_pattern;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AckPolicy {
    /// Each message is acked; one not acked in time is delivered again.
    #[default]
    Explicit,
    /// Every message is delivered once, as fast as possible.
    None,
}

/// Where a new consumer starts; on the wire, the string of
/// [`ConsumerConfig::start`]: `first`, `last`, `new`, `seq:N` or `time:RFC3339`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    First,
    Last,
    New,
    Seq(u64),
    Time(SystemTime),
}

impl std::fmt::Display for Start {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Start::First => f.write_str("first"),
            Start::Last => f.write_str("last"),
            Start::New => f.write_str("new"),
            Start::Seq(n) => write!(f, "seq:{n}"),
            Start::Time(t) => write!(f, "time:{}", humantime::format_rfc3339_nanos(*t)),
        }
    }
}

impl std::str::FromStr for Start {
    type Err = String;
    /// `first`, `last`, `new`, `seq:N` or `time:RFC3339`.
    fn from_str(s: &str) -> Result<Start, String> {
        let bad = || format!("{s:?} must be first, last, new, seq:N or time:RFC3339");
        Ok(match s {
            "first" => Start::First,
            "last" => Start::Last,
            "new" => Start::New,
            _ => {
                if let Some(n) = s.strip_prefix("seq:") {
                    Start::Seq(n.parse().map_err(|_| bad())?)
                } else if let Some(t) = s.strip_prefix("time:") {
                    Start::Time(humantime::parse_rfc3339_weak(t).map_err(|_| bad())?)
                } else {
                    return Err(bad());
                }
            }
        })
    }
}

fn default_start() -> String {
    Start::First.to_string()
}

/// A consumer's settings on the wire (the SDK builds them from its own
/// `ConsumerConfig` builder). Unknown fields are ignored here, so an SDK
/// reads a newer broker's `ConsumerInfo`; the broker refuses them in the
/// create requests it is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerConfig {
    /// Name of a durable consumer; absent for an ephemeral one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<String>,
    /// `first`, `last`, `new`, `seq:N` or `time:RFC3339` (see [`Start`]);
    /// used only when the consumer is created.
    #[serde(default = "default_start")]
    pub start: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_subject: Option<String>,
    #[serde(default)]
    pub ack_policy: AckPolicy,
    /// Redeliver a message not acked within this (default 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_wait_ms: Option<u64>,
    /// Give up on a message after this many deliveries (default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_deliver: Option<u32>,
    /// Most delivered-unacked messages before new ones wait (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ack_pending: Option<usize>,
    /// An ephemeral consumer without pulls for this long is removed (default 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactive_ms: Option<u64>,
}

impl Default for ConsumerConfig {
    /// An ephemeral consumer from the first message, every setting at its
    /// default: what `{}` means.
    fn default() -> Self {
        ConsumerConfig {
            durable: None,
            start: default_start(),
            filter_subject: None,
            ack_policy: AckPolicy::Explicit,
            ack_wait_ms: None,
            max_deliver: None,
            max_ack_pending: None,
            inactive_ms: None,
        }
    }
}

impl ConsumerConfig {
    /// The filter must be a valid pattern and a durable name a valid name
    /// (in that order). `start` is checked when the consumer is created,
    /// against the stream it reads.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(f) = &self.filter_subject {
            validate_pattern(f).map_err(ConfigError::FilterSubject)?;
        }
        if let Some(n) = &self.durable {
            validate_name("consumer", n)?;
        }
        Ok(())
    }

    /// `ack_wait_ms`, or its default of 30 s; at least 1 ms.
    pub fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.ack_wait_ms.unwrap_or(30_000).max(1))
    }

    /// `max_ack_pending`, or its default of 10000; at least 1.
    pub fn max_ack_pending(&self) -> usize {
        self.max_ack_pending.unwrap_or(10_000).max(1)
    }
}

fn one() -> usize {
    1
}

/// The body of `$SB.API.CONSUMER.NEXT.<stream>.<consumer>`: how much to
/// deliver to the request's reply subject. `{}` asks for one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    #[serde(default = "one")]
    pub batch: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<usize>,
    /// How long the pull waits for messages (default 5 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// Answer at once with what there is.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_wait: bool,
}

impl Default for PullRequest {
    fn default() -> Self {
        PullRequest {
            batch: one(),
            max_bytes: None,
            expires_ms: None,
            no_wait: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerInfo {
    pub stream: String,
    /// The durable name, or the name the broker gave an ephemeral consumer.
    pub name: String,
    pub durable: bool,
    pub config: ConsumerConfig,
    /// The next stream sequence never delivered before.
    pub next_seq: u64,
    /// Every message up to here is acked (or given up on).
    pub ack_floor: u64,
    pub num_ack_pending: usize,
    pub num_redelivered: u64,
}

/// The answer to `$SB.API.CONSUMER.LIST.<stream>`, sorted by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerList {
    pub consumers: Vec<ConsumerInfo>,
}

/// What a message to a `$SB.ACK.` subject says about the delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// Done with it (an empty body says the same).
    Ack,
    /// Deliver it again now.
    Nak,
    /// Still working on it: restart its ack wait.
    Progress,
    /// Never deliver it again.
    Term,
}

impl AckKind {
    /// The body that says this kind.
    pub fn payload(self) -> &'static [u8] {
        match self {
            AckKind::Ack => b"+ACK",
            AckKind::Nak => b"-NAK",
            AckKind::Progress => b"+WPI",
            AckKind::Term => b"+TERM",
        }
    }

    /// Reads an ack body; `None` for anything but the four kinds or empty.
    pub fn from_payload(payload: &[u8]) -> Option<AckKind> {
        Some(match payload {
            b"" | b"+ACK" => AckKind::Ack,
            b"-NAK" => AckKind::Nak,
            b"+WPI" => AckKind::Progress,
            b"+TERM" => AckKind::Term,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subject::SubjectError;

    fn pinned<T>(v: &T, json: &str)
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        assert_eq!(serde_json::to_string(v).unwrap(), json);
        assert_eq!(&serde_json::from_str::<T>(json).unwrap(), v);
    }

    fn worker() -> ConsumerConfig {
        ConsumerConfig {
            durable: Some("worker".into()),
            start: "seq:7".into(),
            filter_subject: Some("orders.eu".into()),
            ack_policy: AckPolicy::None,
            ack_wait_ms: Some(30_000),
            max_deliver: Some(5),
            max_ack_pending: Some(100),
            inactive_ms: Some(1000),
        }
    }

    #[test]
    fn consumer_config_json_is_pinned_and_an_empty_body_means_the_defaults() {
        pinned(
            &worker(),
            r#"{"durable":"worker","start":"seq:7","filter_subject":"orders.eu","ack_policy":"none","ack_wait_ms":30000,"max_deliver":5,"max_ack_pending":100,"inactive_ms":1000}"#,
        );
        pinned(
            &ConsumerConfig::default(),
            r#"{"start":"first","ack_policy":"explicit"}"#,
        );
        assert_eq!(
            serde_json::from_str::<ConsumerConfig>("{}").unwrap(),
            ConsumerConfig::default()
        );
        // A field from a newer broker is ignored (the broker refuses
        // unknown fields in the create requests it is sent).
        assert_eq!(
            serde_json::from_str::<ConsumerConfig>(r#"{"bogus":1}"#).unwrap(),
            ConsumerConfig::default()
        );
        assert!(serde_json::from_str::<ConsumerConfig>(r#"{"ack_policy":"all"}"#).is_err());
    }

    #[test]
    fn consumer_defaults_are_30s_ack_wait_and_10000_pending() {
        let d = ConsumerConfig::default();
        assert_eq!(d.ack_wait(), Duration::from_secs(30));
        assert_eq!(d.max_ack_pending(), 10_000);
        let zero = ConsumerConfig {
            ack_wait_ms: Some(0),
            max_ack_pending: Some(0),
            ..d
        };
        assert_eq!(zero.ack_wait(), Duration::from_millis(1));
        assert_eq!(zero.max_ack_pending(), 1);
    }

    #[test]
    fn consumer_configs_check_the_filter_then_the_durable_name() {
        assert_eq!(worker().validate(), Ok(()));
        assert_eq!(ConsumerConfig::default().validate(), Ok(()));
        let c = ConsumerConfig {
            filter_subject: Some("a..b".into()),
            durable: Some("bad name".into()),
            ..worker()
        };
        let e = c.validate().unwrap_err();
        assert!(matches!(
            e,
            ConfigError::FilterSubject(SubjectError::EmptyToken(_))
        ));
        assert!(e.to_string().starts_with("filter subject: "), "{e}");
        for bad in ["a.b", "*", ">", ""] {
            let c = ConsumerConfig {
                durable: Some(bad.into()),
                ..worker()
            };
            assert!(
                matches!(
                    c.validate(),
                    Err(ConfigError::Name {
                        kind: "consumer",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn consumer_info_json_is_pinned() {
        pinned(
            &ConsumerInfo {
                stream: "ORDERS".into(),
                name: "worker".into(),
                durable: true,
                config: worker(),
                next_seq: 5,
                ack_floor: 3,
                num_ack_pending: 1,
                num_redelivered: 2,
            },
            r#"{"stream":"ORDERS","name":"worker","durable":true,"config":{"durable":"worker","start":"seq:7","filter_subject":"orders.eu","ack_policy":"none","ack_wait_ms":30000,"max_deliver":5,"max_ack_pending":100,"inactive_ms":1000},"next_seq":5,"ack_floor":3,"num_ack_pending":1,"num_redelivered":2}"#,
        );
        pinned(&ConsumerList { consumers: vec![] }, r#"{"consumers":[]}"#);
    }

    #[test]
    fn pull_requests_write_only_what_is_set_and_refuse_unknown_fields() {
        // What the SDK has always sent.
        pinned(
            &PullRequest {
                batch: 256,
                expires_ms: Some(5000),
                ..PullRequest::default()
            },
            r#"{"batch":256,"expires_ms":5000}"#,
        );
        pinned(
            &PullRequest {
                batch: 10,
                max_bytes: Some(1 << 20),
                expires_ms: Some(1),
                no_wait: true,
            },
            r#"{"batch":10,"max_bytes":1048576,"expires_ms":1,"no_wait":true}"#,
        );
        assert_eq!(
            serde_json::from_str::<PullRequest>("{}").unwrap(),
            PullRequest::default()
        );
        assert_eq!(PullRequest::default().batch, 1);
        assert!(serde_json::from_str::<PullRequest>(r#"{"batch":1,"x":1}"#).is_err());
    }

    #[test]
    fn start_positions_round_trip_through_their_wire_strings() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_714_564_800_000_000_001);
        for (s, wire) in [
            (Start::First, "first"),
            (Start::Last, "last"),
            (Start::New, "new"),
            (Start::Seq(9), "seq:9"),
            (Start::Time(t), "time:2024-05-01T12:00:00.000000001Z"),
        ] {
            assert_eq!(s.to_string(), wire);
            assert_eq!(wire.parse::<Start>(), Ok(s));
        }
        for bad in ["", "First", "seq:", "seq:-1", "time:yesterday", "latest"] {
            assert_eq!(
                bad.parse::<Start>(),
                Err(format!(
                    "{bad:?} must be first, last, new, seq:N or time:RFC3339"
                ))
            );
        }
        assert_eq!(ConsumerConfig::default().start, "first");
    }

    #[test]
    fn ack_bodies_round_trip_and_empty_is_an_ack() {
        for k in [AckKind::Ack, AckKind::Nak, AckKind::Progress, AckKind::Term] {
            assert_eq!(AckKind::from_payload(k.payload()), Some(k));
        }
        assert_eq!(AckKind::from_payload(b""), Some(AckKind::Ack));
        assert_eq!(AckKind::from_payload(b"+ack"), None);
        assert_eq!(AckKind::from_payload(b"+ACK "), None);
    }
}
