//! JetStream's stream and consumer configurations, read into sockbus's and
//! written back. JetStream speaks nanoseconds and `-1` for "no limit";
//! sockbus milliseconds and absent fields. A setting sockbus does not
//! implement is refused by name (error 10052), never silently dropped,
//! unless it is at JetStream's default.

use serde_json::{json, Map, Value};
use sockbus_protocol::api::{AckPolicy, ConsumerConfig, Fsync, StreamConfig};

use super::JsError;
use crate::streams::consumer::Consumer;
use crate::streams::{rfc3339, PurgeRequest, Stream};

/// JetStream's default `max_ack_pending`.
const DEFAULT_MAX_ACK_PENDING: i64 = 1000;
/// JetStream's default `max_waiting` (pull requests waiting at once).
pub(super) const DEFAULT_MAX_WAITING: i64 = 512;
/// How long an ephemeral consumer lives without pulls, by default (as
/// nats-server).
const DEFAULT_INACTIVE_NS: u64 = 5_000_000_000;
/// The time nats-server writes for "never".
pub(super) const ZERO_TIME: &str = "0001-01-01T00:00:00Z";
const MS: u64 = 1_000_000;

fn invalid(field: &str, want: &str) -> JsError {
    JsError::new(400, 10025, format!("invalid JSON: {field} must be {want}"))
}

/// An integer field: None when absent or null.
fn int(o: &Map<String, Value>, field: &str) -> Result<Option<i64>, JsError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_u64().map(|n| n.min(i64::MAX as u64) as i64))
            .map(Some)
            .ok_or_else(|| invalid(field, "an integer")),
    }
}

/// A positive integer field, or None for absent, 0 and negative (JetStream's "unset").
fn positive(o: &Map<String, Value>, field: &str) -> Result<Option<u64>, JsError> {
    Ok(int(o, field)?.filter(|n| *n > 0).map(|n| n as u64))
}

fn string<'a>(o: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, JsError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str()).filter(|s| !s.is_empty())),
        Some(_) => Err(invalid(field, "a string")),
    }
}

fn boolean(o: &Map<String, Value>, field: &str) -> Result<bool, JsError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(field, "true or false")),
    }
}

/// Is this field set to something beyond JetStream's default (null, empty)?
fn set(o: &Map<String, Value>, field: &str) -> bool {
    match o.get(field) {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
    }
}

pub(super) fn object(v: &Value, what: &str) -> Result<Map<String, Value>, JsError> {
    match v {
        Value::Object(o) => Ok(o.clone()),
        Value::Null => Ok(Map::new()),
        _ => Err(invalid(what, "a JSON object")),
    }
}

/// A JetStream stream configuration as a sockbus stream's. `name` is the
/// one in the request subject.
pub(super) fn stream_from_js(name: &str, v: &Value) -> Result<StreamConfig, JsError> {
    let o = object(v, "the stream configuration")?;
    if let Some(n) = string(&o, "name")? {
        if n != name {
            return Err(JsError::new(
                400,
                10056,
                "stream name in subject does not match request",
            ));
        }
    }
    let subjects = match o.get("subjects") {
        None | Some(Value::Null) => vec![name.to_string()],
        Some(Value::Array(a)) => {
            let mut v = Vec::new();
            for s in a {
                v.push(
                    s.as_str()
                        .ok_or_else(|| invalid("subjects", "a list of strings"))?
                        .to_string(),
                );
            }
            if v.is_empty() {
                v.push(name.to_string());
            }
            v
        }
        Some(_) => return Err(invalid("subjects", "a list of strings")),
    };
    match string(&o, "retention")? {
        None | Some("limits") => {}
        Some(r) => {
            return Err(JsError::unsupported(format!(
                "retention {r:?} (only \"limits\")"
            )))
        }
    }
    match string(&o, "discard")? {
        None | Some("old") => {}
        Some(d) => {
            return Err(JsError::unsupported(format!(
                "discard {d:?} (only \"old\")"
            )))
        }
    }
    let memory = match string(&o, "storage")? {
        None | Some("file") => false,
        Some("memory") => true,
        Some(s) => {
            return Err(invalid("storage", "\"file\" or \"memory\"")).map_err(|e| {
                JsError::new(e.code, e.err_code, format!("{} (got {s:?})", e.description))
            })
        }
    };
    // A replicated stream (Raft, one group per stream) in cluster mode;
    // sockbus keeps an odd number of copies.
    let replicas = match int(&o, "num_replicas")? {
        None | Some(0) | Some(1) => None,
        Some(n @ (3 | 5)) => Some(n as u32),
        Some(_) => return Err(invalid("num_replicas", "1, 3 or 5")),
    };
    let description = string(&o, "description")?.map(str::to_string);
    if positive(&o, "max_msgs_per_subject")?.is_some() {
        return Err(JsError::unsupported("max_msgs_per_subject"));
    }
    if positive(&o, "first_seq")?.is_some_and(|n| n > 1) {
        return Err(JsError::unsupported("first_seq"));
    }
    for f in [
        "mirror",
        "sources",
        "republish",
        "subject_transform",
        "sealed",
        "discard_new_per_subject",
    ] {
        if set(&o, f) {
            return Err(JsError::unsupported(f));
        }
    }
    let mut cfg = StreamConfig::new(name, subjects);
    cfg.max_msgs = positive(&o, "max_msgs")?;
    cfg.max_bytes = positive(&o, "max_bytes")?;
    cfg.max_age_ms = positive(&o, "max_age")?.map(|ns| ns.div_ceil(MS));
    cfg.duplicate_window_ms = positive(&o, "duplicate_window")?.map(|ns| ns.div_ceil(MS));
    cfg.replicas = replicas;
    cfg.max_msg_size = positive(&o, "max_msg_size")?;
    cfg.description = description;
    // `storage: memory` keeps nothing in memory here: the stream is on
    // disk without fsyncs, which loses nothing on a broker crash.
    cfg.fsync = if memory { Fsync::Never } else { Fsync::Always };
    if let Some(Value::Object(md)) = o.get("metadata") {
        if let Some(f) = md.get("sockbus.fsync") {
            cfg.fsync = match f.as_str() {
                Some("always") => Fsync::Always,
                Some("interval") => Fsync::Interval,
                Some("never") => Fsync::Never,
                _ => {
                    return Err(invalid(
                        "metadata \"sockbus.fsync\"",
                        "\"always\", \"interval\" or \"never\"",
                    ))
                }
            };
        }
    }
    Ok(cfg)
}

/// A `STREAM.PURGE` request: `{"filter","seq","keep"}`, all optional
/// (`seq` and `keep` not both; 0 is unset).
pub(super) fn purge_from_js(v: &Value) -> Result<PurgeRequest, JsError> {
    let o = object(v, "the purge request")?;
    let req = PurgeRequest {
        filter: string(&o, "filter")?.map(str::to_string),
        seq: positive(&o, "seq")?,
        keep: positive(&o, "keep")?,
    };
    if let Some(f) = &req.filter {
        if sockbus_protocol::validate_pattern(f).is_err() {
            return Err(JsError::bad_request(format!(
                "bad request: filter {f:?} is not a valid subject"
            )));
        }
    }
    if req.seq.is_some() && req.keep.is_some() {
        return Err(JsError::bad_request(
            "bad request: a purge takes seq or keep, not both",
        ));
    }
    Ok(req)
}

/// A `STREAM.MSG.DELETE` request: `{"seq": N}` and optionally `no_erase`
/// (accepted; see docs/nats.md: sockbus never overwrites the record).
pub(super) fn msg_delete_from_js(v: &Value) -> Result<u64, JsError> {
    let o = object(v, "the delete request")?;
    let _ = boolean(&o, "no_erase")?;
    positive(&o, "seq")?.ok_or_else(|| JsError::bad_request("bad request: seq is required"))
}

fn fsync_name(f: Fsync) -> &'static str {
    match f {
        Fsync::Always => "always",
        Fsync::Interval => "interval",
        Fsync::Never => "never",
    }
}

fn limit(v: Option<u64>) -> i64 {
    v.map_or(-1, |n| n.min(i64::MAX as u64) as i64)
}

/// A sockbus stream's configuration in JetStream's words.
pub(super) fn stream_to_js(cfg: &StreamConfig) -> Value {
    let mut v = json!({
        "name": cfg.name,
        "subjects": cfg.subjects,
        "retention": "limits",
        "max_consumers": -1,
        "max_msgs": limit(cfg.max_msgs),
        "max_bytes": limit(cfg.max_bytes),
        "max_age": cfg.max_age_ms.unwrap_or(0).saturating_mul(MS),
        "max_msgs_per_subject": -1,
        "max_msg_size": limit(cfg.max_msg_size),
        "discard": "old",
        // `fsync = never` is what `storage: memory` asked for.
        "storage": if cfg.fsync == Fsync::Never { "memory" } else { "file" },
        "num_replicas": cfg.replicas(),
        "duplicate_window": cfg.duplicate_window().as_nanos() as u64,
        "sealed": false,
        "deny_delete": false,
        "deny_purge": false,
        "allow_rollup_hdrs": false,
        "allow_direct": false,
        "mirror_direct": false,
        "metadata": {"sockbus.fsync": fsync_name(cfg.fsync)},
    });
    if let Some(d) = &cfg.description {
        v["description"] = json!(d);
    }
    v
}

fn now_rfc3339() -> String {
    rfc3339(crate::store::now_ns())
}

/// A stream's info in JetStream's shape: config, created, state.
pub(super) fn stream_info(s: &Stream) -> Value {
    let info = s.info();
    let st = &info.state;
    let mut v = json!({
        "config": stream_to_js(&s.config()),
        "created": rfc3339(s.created_ns()),
        "state": {
            "messages": st.messages,
            "bytes": st.bytes,
            "first_seq": st.first_seq,
            "first_ts": st.first_ts.clone().unwrap_or_else(|| ZERO_TIME.into()),
            "last_seq": st.last_seq,
            "last_ts": st.last_ts.clone().unwrap_or_else(|| ZERO_TIME.into()),
            "consumer_count": st.consumers,
        },
        "ts": now_rfc3339(),
    });
    let deleted = s.log.lock().deleted();
    if deleted > 0 {
        v["state"]["num_deleted"] = json!(deleted);
    }
    if let Some(c) = &info.cluster {
        v["cluster"] = cluster_to_js(c);
    }
    v
}

/// `STREAM.MSG.GET`: one stored message, by `seq`, as the newest on a
/// subject (`last_by_subj`), or as the first on a subject from `seq` on
/// (`next_by_subj`). Reads the stream's log (a subject lookup scans it
/// from the start: meant for occasional reads, like nats-server without
/// its per-subject index). 404 / 10037 when there is no such message.
pub(super) fn stream_msg_get(s: &Stream, req: &Value) -> Result<Value, JsError> {
    let o = object(req, "the request")?;
    let seq = positive(&o, "seq")?;
    let last_by = string(&o, "last_by_subj")?.filter(|x| !x.is_empty());
    let next_by = string(&o, "next_by_subj")?.filter(|x| !x.is_empty());
    for subj in [last_by, next_by].into_iter().flatten() {
        if sockbus_protocol::validate_pattern(subj).is_err() {
            return Err(invalid("the subject", "a valid subject"));
        }
    }
    let not_found = || JsError::new(404, 10037, "no message found");
    let io = |e: std::io::Error| JsError::new(500, 10077, format!("reading the stream: {e}"));
    let first = s.log.lock().first_seq();
    let msg = match (seq, last_by, next_by) {
        (Some(seq), None, None) => {
            let b = s.log.read(seq, None, 1, 1, None).map_err(io)?;
            b.msgs.into_iter().next().filter(|m| m.seq == seq)
        }
        (seq, None, Some(subj)) => {
            let mut from = seq.unwrap_or(first).max(first);
            let mut pos = None;
            loop {
                let b = s.log.read(from, Some(subj), 1, 1, pos).map_err(io)?;
                if let Some(m) = b.msgs.into_iter().next() {
                    break Some(m);
                }
                if b.next <= from {
                    break None;
                }
                (from, pos) = (b.next, b.pos);
            }
        }
        (None, Some(subj), None) => s.log.last_matching(subj).map_err(io)?,
        _ => {
            return Err(JsError::new(
                400,
                10003,
                "bad request: give seq, last_by_subj, or next_by_subj with an optional seq",
            ))
        }
    }
    .ok_or_else(not_found)?;
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut m = json!({
        "subject": msg.subject(),
        "seq": msg.seq,
        "data": b64.encode(&msg.payload),
        "time": rfc3339(msg.ts),
    });
    if !msg.headers.is_empty() {
        m["hdrs"] = json!(b64.encode(sockbus_protocol::nats::headers_text(&msg.headers)));
    }
    Ok(json!({ "message": m }))
}

/// JetStream's `cluster` block of a stream's info: the leader, and the
/// other replicas with whether they are current (no lag known to the
/// leader). Only replicated streams have one.
fn cluster_to_js(c: &sockbus_protocol::api::StreamCluster) -> Value {
    let replicas: Vec<Value> = c
        .replicas
        .iter()
        .filter(|p| Some(&p.name) != c.leader.as_ref())
        .map(|p| {
            let mut r = json!({"name": p.name, "current": p.lag == Some(0), "active": 0});
            if let Some(lag) = p.lag {
                r["lag"] = json!(lag);
            }
            r
        })
        .collect();
    let mut v = json!({"name": "sockbus", "replicas": replicas});
    if let Some(l) = &c.leader {
        v["leader"] = json!(l);
    }
    v
}

/// A consumer asked for through `$JS.API`: sockbus's configuration, its
/// name, and the JetStream configuration to report and keep.
#[derive(Debug)]
pub(super) struct JsConsumer {
    pub cfg: ConsumerConfig,
    pub name: Option<String>,
    pub js: Value,
}

/// Reads a JetStream consumer configuration. `subject_name` is the name
/// in the request subject (`CONSUMER.CREATE.<stream>.<name>`), `durable`
/// says it came by `CONSUMER.DURABLE.CREATE`, `filter` is the subject's
/// filter part.
pub(super) fn consumer_from_js(
    v: &Value,
    subject_name: Option<&str>,
    durable: bool,
    filter: Option<&str>,
) -> Result<JsConsumer, JsError> {
    let mut o = object(v, "the consumer configuration")?;
    let durable_name = string(&o, "durable_name")?.map(str::to_string);
    let given = string(&o, "name")?.map(str::to_string);
    if let Some(n) = subject_name {
        for x in [&durable_name, &given].into_iter().flatten() {
            if x != n {
                return Err(JsError::new(
                    400,
                    10017,
                    "consumer name in subject does not match durable name in request",
                ));
            }
        }
    }
    let name = durable_name
        .clone()
        .or(given)
        .or(subject_name.map(str::to_string));
    let is_durable = durable || durable_name.is_some();
    let deliver = string(&o, "deliver_policy")?.unwrap_or("all").to_string();
    let start = match deliver.as_str() {
        "all" => "first".to_string(),
        "last" => "last".to_string(),
        "new" => "new".to_string(),
        "by_start_sequence" => format!(
            "seq:{}",
            positive(&o, "opt_start_seq")?.ok_or_else(|| JsError::new(
                400,
                10094,
                "consumer deliver policy by_start_sequence needs opt_start_seq"
            ))?
        ),
        "by_start_time" => format!(
            "time:{}",
            string(&o, "opt_start_time")?.ok_or_else(|| JsError::new(
                400,
                10094,
                "consumer deliver policy by_start_time needs opt_start_time"
            ))?
        ),
        other => return Err(JsError::unsupported(format!("deliver_policy {other:?}"))),
    };
    let ack = string(&o, "ack_policy")?.unwrap_or("explicit").to_string();
    let ack_policy = match ack.as_str() {
        "explicit" | "all" => AckPolicy::Explicit,
        "none" => AckPolicy::None,
        other => {
            return Err(invalid("ack_policy", "\"explicit\", \"all\" or \"none\"")).map_err(|e| {
                JsError::new(
                    e.code,
                    e.err_code,
                    format!("{} (got {other:?})", e.description),
                )
            })
        }
    };
    match string(&o, "replay_policy")? {
        None | Some("instant") => {}
        Some(r) => {
            return Err(JsError::unsupported(format!(
                "replay_policy {r:?} (only \"instant\")"
            )))
        }
    }
    for f in ["headers_only", "backoff", "rate_limit_bps", "pause_until"] {
        if set(&o, f) {
            return Err(JsError::unsupported(f));
        }
    }
    let mut filters: Vec<String> = Vec::new();
    if let Some(f) = string(&o, "filter_subject")? {
        filters.push(f.to_string());
    }
    match o.get("filter_subjects") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) => {
            for f in a {
                let f = f
                    .as_str()
                    .ok_or_else(|| invalid("filter_subjects", "a list of strings"))?;
                if !filters.iter().any(|x| x == f) {
                    filters.push(f.to_string());
                }
            }
        }
        Some(_) => return Err(invalid("filter_subjects", "a list of strings")),
    }
    if let Some(f) = filter {
        if filters.is_empty() {
            filters.push(f.to_string());
        } else if filters.len() > 1 || filters[0] != f {
            return Err(JsError::new(
                400,
                10093,
                "consumer create request did not match filtered subject from create subject",
            ));
        }
    }
    if filters.len() > 1 {
        return Err(JsError::unsupported("more than one filter subject"));
    }
    let ack_wait = positive(&o, "ack_wait")?.unwrap_or(30_000 * MS);
    let max_deliver = positive(&o, "max_deliver")?;
    let max_ack_pending = int(&o, "max_ack_pending")?
        .filter(|n| *n != 0)
        .unwrap_or(DEFAULT_MAX_ACK_PENDING);
    let inactive = positive(&o, "inactive_threshold")?.unwrap_or(DEFAULT_INACTIVE_NS);
    let deliver_subject = string(&o, "deliver_subject")?.map(str::to_string);
    let _ = boolean(&o, "flow_control")?;
    let cfg = ConsumerConfig {
        durable: is_durable.then(|| name.clone()).flatten(),
        start,
        filter_subject: filters.first().cloned(),
        ack_policy,
        ack_wait_ms: Some(ack_wait.div_ceil(MS)),
        max_deliver: max_deliver.map(|n| n.min(u32::MAX as u64) as u32),
        max_ack_pending: (max_ack_pending > 0).then_some(max_ack_pending as usize),
        inactive_ms: (!is_durable).then(|| inactive.div_ceil(MS)),
    };
    if is_durable && name.is_none() {
        return Err(JsError::bad_request("a durable consumer needs a name"));
    }
    // What is reported back and kept: the request with the defaults filled in.
    if let Some(n) = &name {
        o.insert("name".into(), json!(n));
    }
    if is_durable {
        o.insert("durable_name".into(), json!(name));
    } else {
        o.remove("durable_name");
        o.insert("inactive_threshold".into(), json!(inactive));
    }
    o.insert("deliver_policy".into(), json!(deliver));
    o.insert("ack_policy".into(), json!(ack));
    o.insert("ack_wait".into(), json!(ack_wait));
    o.insert(
        "max_deliver".into(),
        json!(max_deliver.map_or(-1, |n| n as i64)),
    );
    o.insert("max_ack_pending".into(), json!(max_ack_pending));
    o.insert("replay_policy".into(), json!("instant"));
    match filters.first() {
        Some(f) => o.insert("filter_subject".into(), json!(f)),
        None => o.remove("filter_subject"),
    };
    o.remove("filter_subjects");
    if deliver_subject.is_none() {
        let w = int(&o, "max_waiting")?
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_MAX_WAITING);
        o.insert("max_waiting".into(), json!(w));
    }
    o.insert("num_replicas".into(), json!(0));
    Ok(JsConsumer {
        cfg,
        name,
        js: Value::Object(o),
    })
}

/// The JetStream configuration of a consumer: what it was created with
/// through `$JS.API`, or a consumer created through sockbus's own API in
/// JetStream's words.
pub(super) fn consumer_js_config(c: &Consumer) -> Value {
    if let Some(v) = &c.nats {
        return v.clone();
    }
    let cfg = &c.config;
    let (deliver, opt) = match cfg.start.as_str() {
        "last" => ("last", None),
        "new" => ("new", None),
        s if s.starts_with("seq:") => (
            "by_start_sequence",
            Some(("opt_start_seq", json!(s[4..].parse::<u64>().unwrap_or(1)))),
        ),
        s if s.starts_with("time:") => ("by_start_time", Some(("opt_start_time", json!(&s[5..])))),
        _ => ("all", None),
    };
    let mut o = Map::new();
    o.insert("name".into(), json!(c.name));
    if let Some(d) = &cfg.durable {
        o.insert("durable_name".into(), json!(d));
    }
    o.insert("deliver_policy".into(), json!(deliver));
    if let Some((k, v)) = opt {
        o.insert(k.into(), v);
    }
    o.insert(
        "ack_policy".into(),
        json!(match cfg.ack_policy {
            AckPolicy::Explicit => "explicit",
            AckPolicy::None => "none",
        }),
    );
    o.insert("ack_wait".into(), json!(cfg.ack_wait().as_nanos() as u64));
    o.insert(
        "max_deliver".into(),
        json!(cfg.max_deliver.map_or(-1, i64::from)),
    );
    if let Some(f) = &cfg.filter_subject {
        o.insert("filter_subject".into(), json!(f));
    }
    o.insert("replay_policy".into(), json!("instant"));
    o.insert("max_waiting".into(), json!(DEFAULT_MAX_WAITING));
    o.insert("max_ack_pending".into(), json!(cfg.max_ack_pending()));
    Value::Object(o)
}

/// A consumer's info in JetStream's shape.
pub(super) fn consumer_info(c: &Consumer) -> Value {
    let i = c.info();
    let delivered = c.delivered.load(std::sync::atomic::Ordering::Relaxed);
    json!({
        "stream_name": c.stream,
        "name": c.name,
        "created": rfc3339(c.created),
        "config": consumer_js_config(c),
        "delivered": {"consumer_seq": delivered, "stream_seq": i.next_seq.saturating_sub(1)},
        "ack_floor": {
            "consumer_seq": delivered.saturating_sub(i.num_ack_pending as u64),
            "stream_seq": i.ack_floor,
        },
        "num_ack_pending": i.num_ack_pending,
        "num_redelivered": i.num_redelivered,
        "num_waiting": c.waiting(),
        "num_pending": c.num_pending(),
        "ts": now_rfc3339(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jetstream_stream_config_becomes_a_sockbus_one_and_back() {
        let v = json!({"name": "S", "subjects": ["s.>"], "max_msgs": -1, "max_bytes": 1024,
            "max_age": 1_500_000_000u64, "duplicate_window": 60_000_000_000u64,
            "storage": "file", "retention": "limits", "discard": "old", "num_replicas": 1,
            "max_msgs_per_subject": -1, "sealed": false, "mirror": null});
        let c = stream_from_js("S", &v).unwrap();
        assert_eq!(
            (
                c.max_msgs,
                c.max_bytes,
                c.max_age_ms,
                c.duplicate_window_ms,
                c.fsync
            ),
            (None, Some(1024), Some(1500), Some(60_000), Fsync::Always)
        );
        let back = stream_to_js(&c);
        assert_eq!(back["max_msgs"], -1);
        assert_eq!(back["max_age"], 1_500_000_000u64);
        // No subjects: the stream's name; memory storage: no fsync.
        let c = stream_from_js("S", &json!({"storage": "memory"})).unwrap();
        assert_eq!((c.subjects, c.fsync), (vec!["S".to_string()], Fsync::Never));
        let e = stream_from_js("S", &json!({"retention": "workqueue"})).unwrap_err();
        assert_eq!(e.err_code, 10052);
        assert!(e.description.contains("retention \"workqueue\""), "{e:?}");
        assert_eq!(
            stream_from_js("S", &json!({"name": "T"}))
                .unwrap_err()
                .err_code,
            10056
        );
        assert_eq!(
            stream_from_js("S", &json!({"max_msgs": "x"}))
                .unwrap_err()
                .err_code,
            10025
        );
        assert_eq!(
            stream_from_js("S", &json!([1])).unwrap_err().err_code,
            10025
        );
    }

    #[test]
    fn a_jetstream_consumer_config_becomes_a_sockbus_one_with_defaults_filled_in() {
        let c = consumer_from_js(
            &json!({"durable_name": "w", "deliver_policy": "by_start_sequence",
                    "opt_start_seq": 7, "ack_policy": "all", "ack_wait": 2_000_000_000u64,
                    "filter_subjects": ["s.eu"]}),
            None,
            false,
            None,
        )
        .unwrap();
        assert_eq!(c.cfg.durable.as_deref(), Some("w"));
        assert_eq!(c.cfg.start, "seq:7");
        assert_eq!(c.cfg.ack_policy, AckPolicy::Explicit);
        assert_eq!(c.cfg.ack_wait_ms, Some(2000));
        assert_eq!(c.cfg.filter_subject.as_deref(), Some("s.eu"));
        assert_eq!(c.js["ack_policy"], "all");
        assert_eq!(c.js["max_ack_pending"], 1000);
        assert_eq!(c.js["max_waiting"], 512);
        // Ephemeral by name, removed after 5 s idle by default.
        let c = consumer_from_js(&json!({"name": "e"}), Some("e"), false, None).unwrap();
        assert_eq!((c.cfg.durable, c.cfg.inactive_ms), (None, Some(5000)));
        let two = json!({"filter_subjects": ["a", "b"]});
        assert_eq!(
            consumer_from_js(&two, None, false, None)
                .unwrap_err()
                .err_code,
            10052
        );
        let e = consumer_from_js(
            &json!({"deliver_policy": "by_start_sequence"}),
            None,
            false,
            None,
        )
        .unwrap_err();
        assert_eq!(e.err_code, 10094);
    }
}
