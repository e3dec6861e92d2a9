//! Streams: the configuration a stream is created with (also its
//! `stream.json` on the broker's disk), what it reports about itself, and
//! the ack of a stored publish.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{subject, validate_name, ConfigError};
use crate::subject::{is_inbox, validate_pattern};

/// Smallest `segment_bytes` a stream accepts.
pub const MIN_SEGMENT_BYTES: u64 = 1024;

/// When a stored message reaches the disk, and so when its ack is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// The ack is sent once the data is on disk (group commit).
    #[default]
    Always,
    /// Written at once, `fdatasync`ed every `fsync_interval_ms`.
    Interval,
    /// Left to the kernel.
    Never,
}

impl std::str::FromStr for Fsync {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(Fsync::Always),
            "interval" => Ok(Fsync::Interval),
            "never" => Ok(Fsync::Never),
            _ => Err(format!(
                "fsync must be always, interval or never, got {s:?}"
            )),
        }
    }
}

/// A stream's settings, as created (JSON on the API and in `stream.json`).
/// Unknown fields are ignored here, so an SDK reads the answers of a newer
/// broker that added one; the broker refuses them in what it is sent (a
/// misspelt limit is an error there, not ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamConfig {
    pub name: String,
    /// Subject patterns whose messages the stream stores.
    pub subjects: Vec<String>,
    #[serde(default)]
    pub fsync: Fsync,
    /// For `fsync = interval`: the longest a write stays only in memory (default 100 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsync_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msgs: Option<u64>,
    /// Size at which a segment is sealed and a new one started (default 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_bytes: Option<u64>,
    /// How long a `Msg-Id` is remembered for deduplication (default 2 minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_window_ms: Option<u64>,
    /// Copies kept by a cluster: 1 (None: this broker alone), 3 or 5, one
    /// Raft group replicating the stream on that many nodes
    /// (docs/storage.md, "Replicated streams").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Largest message (headers and payload) the stream stores; a larger
    /// publish is refused (JetStream's `max_msg_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msg_size: Option<u64>,
    /// Free text for people (JetStream's `description`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl StreamConfig {
    /// A stream of these subjects, `fsync = always`, no limits.
    pub fn new<S: Into<String>>(
        name: impl Into<String>,
        subjects: impl IntoIterator<Item = S>,
    ) -> Self {
        StreamConfig {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
            fsync: Fsync::Always,
            fsync_interval_ms: None,
            max_age_ms: None,
            max_bytes: None,
            max_msgs: None,
            segment_bytes: None,
            duplicate_window_ms: None,
            replicas: None,
            max_msg_size: None,
            description: None,
        }
    }

    /// Copies of the stream: 1 unless replicated.
    pub fn replicas(&self) -> u32 {
        self.replicas.unwrap_or(1).max(1)
    }

    /// What the stream's own fields allow; whether its subjects overlap
    /// another stream's is for the broker to say.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_name("stream", &self.name)?;
        if self.subjects.is_empty() {
            return Err(ConfigError::NoSubjects);
        }
        for s in &self.subjects {
            validate_pattern(s).map_err(ConfigError::Subject)?;
            if subject::is_reserved(s) {
                return Err(ConfigError::Reserved(s.clone()));
            }
            // A request's reply is for the requester alone; a wildcard such
            // as `>` still stands for every other subject.
            if is_inbox(s) {
                return Err(ConfigError::Inbox(s.clone()));
            }
        }
        if self.segment_bytes.is_some_and(|b| b < MIN_SEGMENT_BYTES) {
            return Err(ConfigError::SegmentTooSmall);
        }
        if let Some(r) = self.replicas {
            if ![1, 3, 5].contains(&r) {
                return Err(ConfigError::Replicas(r));
            }
        }
        Ok(())
    }

    /// `duplicate_window_ms`, or its default of 2 minutes.
    pub fn duplicate_window(&self) -> Duration {
        Duration::from_millis(self.duplicate_window_ms.unwrap_or(120_000))
    }
}

/// What a purge removes: every message, or only those matching `filter`,
/// and of those only the ones below sequence `seq`, or all but the newest
/// `keep` (not both). `{}` purges everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u64>,
}

/// The answer to a purge: how many messages it removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purged {
    pub purged: u64,
}

/// What a stored publish is answered with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PubAck {
    pub stream: String,
    pub seq: u64,
    /// The message carried a `Msg-Id` already stored within the duplicate window.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// A stream's contents, as `INFO` and `GET /v1/streams` report them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// RFC 3339, absent while the stream is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_ts: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ts: Option<String>,
    pub segments: usize,
    pub consumers: usize,
    /// Records found damaged on disk (CRC mismatch) and skipped.
    pub damaged_records: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub config: StreamConfig,
    pub state: StreamState,
    /// A replicated stream's Raft group as this node sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<StreamCluster>,
}

/// The body of `$SB.API.STREAM.REPLACE_PEER.<stream>`: the replica `old`
/// (a node gone for good) is replaced by node `new`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplacePeer {
    pub old: String,
    pub new: String,
}

/// Where a replicated stream's copies are: its leader and each replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamCluster {
    /// The node (its `--node-id`) leading the group, when one is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The Raft term.
    pub term: u64,
    /// The last Raft log index this node knows committed.
    pub committed: u64,
    pub replicas: Vec<PeerInfo>,
}

/// One replica of a replicated stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerInfo {
    pub name: String,
    /// Raft log index the replica has (on the leader: its matched index;
    /// elsewhere only the node's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<u64>,
    /// Log entries it is behind the leader's last one (known on the leader).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    pub leader: bool,
}

/// The answer to `$SB.API.STREAM.LIST`, sorted by name: one page. The
/// broker fills a page up to its largest payload; `total` is how many
/// streams there are and `offset` where this page starts, so a client asks
/// again from `offset + streams.len()` until it has `total` (a broker older
/// than paging sends neither and lists everything at once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamList {
    pub streams: Vec<StreamInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// The optional body of `$SB.API.STREAM.LIST`: with `subject`, only the
/// stream that would store a message published to that subject (none or
/// one: streams' subjects never overlap); with `offset`, the page starting
/// at that position of the name-sorted list. Empty body: the first page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamListRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subject::SubjectError;

    /// Round-trips `v` and checks its JSON is exactly `json` (what brokers
    /// and SDKs before the types were shared wrote).
    fn pinned<T>(v: &T, json: &str)
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        assert_eq!(serde_json::to_string(v).unwrap(), json);
        assert_eq!(&serde_json::from_str::<T>(json).unwrap(), v);
    }

    fn orders() -> StreamConfig {
        StreamConfig {
            fsync: Fsync::Interval,
            fsync_interval_ms: Some(50),
            max_age_ms: Some(86_400_000),
            max_msgs: Some(1000),
            duplicate_window_ms: Some(60_000),
            ..StreamConfig::new("ORDERS", ["orders.>"])
        }
    }

    fn state() -> StreamState {
        StreamState {
            messages: 2,
            bytes: 100,
            first_seq: 1,
            last_seq: 2,
            first_ts: Some("2024-05-01T12:00:00.000000001Z".into()),
            last_ts: Some("2024-05-01T12:00:01Z".into()),
            segments: 1,
            consumers: 1,
            damaged_records: 0,
        }
    }

    #[test]
    fn stream_config_json_is_pinned_and_unset_limits_are_left_out() {
        pinned(
            &StreamConfig::new("ORDERS", ["orders.>"]),
            r#"{"name":"ORDERS","subjects":["orders.>"],"fsync":"always"}"#,
        );
        pinned(
            &orders(),
            r#"{"name":"ORDERS","subjects":["orders.>"],"fsync":"interval","fsync_interval_ms":50,"max_age_ms":86400000,"max_msgs":1000,"duplicate_window_ms":60000}"#,
        );
        let all = StreamConfig {
            fsync: Fsync::Never,
            max_bytes: Some(1 << 30),
            segment_bytes: Some(4096),
            ..orders()
        };
        let back: StreamConfig =
            serde_json::from_str(&serde_json::to_string(&all).unwrap()).unwrap();
        assert_eq!(back, all);
    }

    #[test]
    fn stream_config_defaults_fsync_and_refuses_bad_fsync_values() {
        let c: StreamConfig = serde_json::from_str(r#"{"name":"A","subjects":["a"]}"#).unwrap();
        assert_eq!(c, StreamConfig::new("A", ["a"]));
        assert!(serde_json::from_str::<StreamConfig>(
            r#"{"name":"x","subjects":["a"],"fsync":"sometimes"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<StreamConfig>(r#"{"subjects":["a"]}"#).is_err());
    }

    #[test]
    fn fsync_parses_its_three_names_only() {
        for f in [Fsync::Always, Fsync::Interval, Fsync::Never] {
            let name = serde_json::to_value(f).unwrap();
            assert_eq!(name.as_str().unwrap().parse::<Fsync>(), Ok(f));
        }
        assert_eq!(
            "Always".parse::<Fsync>().unwrap_err(),
            r#"fsync must be always, interval or never, got "Always""#
        );
    }

    #[test]
    fn stream_info_json_is_pinned_and_timestamps_are_left_out_while_empty() {
        pinned(
            &StreamInfo {
                config: orders(),
                state: state(),
                cluster: None,
            },
            r#"{"config":{"name":"ORDERS","subjects":["orders.>"],"fsync":"interval","fsync_interval_ms":50,"max_age_ms":86400000,"max_msgs":1000,"duplicate_window_ms":60000},"state":{"messages":2,"bytes":100,"first_seq":1,"last_seq":2,"first_ts":"2024-05-01T12:00:00.000000001Z","last_ts":"2024-05-01T12:00:01Z","segments":1,"consumers":1,"damaged_records":0}}"#,
        );
        pinned(
            &StreamState {
                messages: 0,
                first_ts: None,
                last_ts: None,
                ..state()
            },
            r#"{"messages":0,"bytes":100,"first_seq":1,"last_seq":2,"segments":1,"consumers":1,"damaged_records":0}"#,
        );
        pinned(
            &StreamList {
                streams: vec![],
                total: None,
                offset: None,
            },
            r#"{"streams":[]}"#,
        );
        pinned(
            &StreamList {
                streams: vec![],
                total: Some(0),
                offset: Some(0),
            },
            r#"{"streams":[],"total":0,"offset":0}"#,
        );
        pinned(&StreamListRequest::default(), "{}");
        pinned(
            &StreamListRequest {
                subject: Some("orders.eu".into()),
                offset: None,
            },
            r#"{"subject":"orders.eu"}"#,
        );
        pinned(
            &StreamListRequest {
                subject: None,
                offset: Some(40),
            },
            r#"{"offset":40}"#,
        );
    }

    /// What an SDK reads from a broker newer than itself; the broker
    /// refuses unknown fields in the requests it is sent (its own check).
    #[test]
    fn stream_info_with_fields_from_a_newer_broker_still_reads() {
        let json = r#"{"config":{"name":"ORDERS","subjects":["orders.>"],"fsync":"interval","fsync_interval_ms":50,"max_age_ms":86400000,"max_msgs":1000,"duplicate_window_ms":60000,"replicas":3},"state":{"messages":2,"bytes":100,"first_seq":1,"last_seq":2,"first_ts":"2024-05-01T12:00:00.000000001Z","last_ts":"2024-05-01T12:00:01Z","segments":1,"consumers":1,"damaged_records":0,"deleted":[]},"cluster":{"leader":"b1"}}"#;
        let info: StreamInfo = serde_json::from_str(json).unwrap();
        assert_eq!(
            info,
            StreamInfo {
                config: StreamConfig {
                    replicas: Some(3),
                    ..orders()
                },
                state: state(),
                cluster: Some(StreamCluster {
                    leader: Some("b1".into()),
                    ..Default::default()
                }),
            }
        );
    }

    #[test]
    fn pub_ack_says_duplicate_only_when_it_was_one() {
        let mut a = PubAck {
            stream: "ORDERS".into(),
            seq: 42,
            duplicate: false,
        };
        pinned(&a, r#"{"stream":"ORDERS","seq":42}"#);
        a.duplicate = true;
        pinned(&a, r#"{"stream":"ORDERS","seq":42,"duplicate":true}"#);
    }

    #[test]
    fn stream_configs_are_validated_with_the_errors_users_see() {
        assert_eq!(orders().validate(), Ok(()));
        let bad = |f: fn(&mut StreamConfig)| {
            let mut c = orders();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(matches!(
            bad(|c| c.name = "has space".into()),
            ConfigError::Name { kind: "stream", .. }
        ));
        assert!(matches!(
            bad(|c| c.name = "a.b".into()),
            ConfigError::Name { .. }
        ));
        assert_eq!(
            bad(|c| c.subjects.clear()).to_string(),
            "a stream needs at least one subject"
        );
        assert!(matches!(
            bad(|c| c.subjects = vec!["a..b".into()]),
            ConfigError::Subject(SubjectError::EmptyToken(_))
        ));
        assert_eq!(
            bad(|c| c.subjects = vec!["$SB.API.>".into()]).to_string(),
            r#"subject "$SB.API.>" is reserved"#
        );
        assert_eq!(
            bad(|c| c.subjects = vec!["orders.>".into(), "_INBOX.>".into()]).to_string(),
            r#"subject "_INBOX.>" is under _INBOX.: streams never capture reply subjects"#
        );
        assert!(matches!(
            bad(|c| c.subjects = vec!["_INBOX.abc.*".into()]),
            ConfigError::Inbox(_)
        ));
        // Wildcards that also cover _INBOX. subjects are fine: those are
        // simply not captured.
        for p in [">", "*.>", "*.*"] {
            let mut c = orders();
            c.subjects = vec![p.into()];
            assert_eq!(c.validate(), Ok(()), "{p}");
        }
        assert_eq!(
            bad(|c| c.segment_bytes = Some(1023)).to_string(),
            "segment_bytes must be at least 1024"
        );
        let mut c = orders();
        c.segment_bytes = Some(1024);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn the_duplicate_window_defaults_to_two_minutes() {
        assert_eq!(
            StreamConfig::new("A", ["a"]).duplicate_window(),
            Duration::from_secs(120)
        );
        assert_eq!(orders().duplicate_window(), Duration::from_secs(60));
    }
}
