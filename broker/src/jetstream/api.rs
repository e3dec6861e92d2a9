//! `$JS.API.…` requests and `$JS.ACK.…` acks, answered on the request's
//! reply subject in JetStream's JSON (`type`, `error: {code, err_code,
//! description}`). Dispatch only: the work is the streams' (crate::streams).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sockbus_protocol::api::AckKind;

use super::config::{
    consumer_from_js, consumer_info, consumer_js_config, msg_delete_from_js, object, purge_from_js,
    stream_from_js, stream_info, stream_msg_get, DEFAULT_MAX_WAITING,
};
use super::{parse_ack, send_status, status, Ctx, JsError};
use crate::deliver::Delivery;
use crate::streams::consumer::{self, Consumer, Flavor, Pull};
use crate::streams::{Fsync, Stream, StreamConfig, StreamError, Streams};

const API_PREFIX: &str = "$JS.API.";
/// Most names in one `STREAM.NAMES`/`CONSUMER.NAMES` page, and infos in
/// one `LIST` page (as nats-server).
const NAMES_PAGE: usize = 1024;
const LIST_PAGE: usize = 256;

fn type_of(kind: &str) -> String {
    format!("io.nats.jetstream.api.v1.{kind}_response")
}

/// Answers on `reply`: the value with its `type`, or the error.
fn answer(d: &Delivery, reply: Option<&str>, kind: &str, r: Result<Value, JsError>) {
    let Some(reply) = reply else { return };
    let mut v = match r {
        Ok(Value::Object(mut o)) => {
            o.insert("type".into(), json!(type_of(kind)));
            Value::Object(o)
        }
        Ok(other) => other,
        Err(e) => json!({"type": type_of(kind), "error": e.json()}),
    };
    let mut body = serde_json::to_vec(&v).expect("serialisable");
    if body.len() > d.max_payload() {
        v = json!({"type": type_of(kind), "error": JsError::bad_request(format!(
            "the answer is {} bytes, more than the largest payload, {} bytes (--max-payload)",
            body.len(), d.max_payload())).json()});
        body = serde_json::to_vec(&v).expect("serialisable");
    }
    let _ = d.publish_now(reply, &[], &body);
}

/// A request body as JSON; an empty body is `{}`.
fn body(payload: &[u8]) -> Result<Value, JsError> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(payload)
        .map_err(|e| JsError::new(400, 10025, format!("invalid JSON: {e}")))
}

/// `offset` of a paged request.
fn offset(v: &Value) -> usize {
    v.get("offset").and_then(Value::as_u64).unwrap_or(0) as usize
}

/// Runs disk work (creating, deleting a stream: files fsynced) on the
/// blocking pool and answers when done, so no reader waits on the disk.
fn on_disk<F>(ctx: &Ctx<'_>, reply: Option<&str>, kind: &'static str, f: F)
where
    F: FnOnce(&Streams) -> Result<Value, JsError> + Send + 'static,
{
    let streams = ctx.streams.clone();
    let d = ctx.delivery.clone();
    let reply = reply.map(str::to_string);
    let job = move || answer(&d, reply.as_deref(), kind, f(&streams));
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(job)),
        Err(_) => job(),
    }
}

/// Handles a publish to `$JS.…` (never routed to subscribers).
pub(crate) fn handle(
    streams: &Arc<Streams>,
    delivery: &Delivery,
    subject: &str,
    reply: Option<&str>,
    _headers: &[u8],
    payload: &[u8],
) {
    let ctx = &Ctx { streams, delivery };
    if subject.starts_with(super::ACK_PREFIX) {
        ack(ctx, subject, reply, payload);
        return;
    }
    let Some(rest) = subject.strip_prefix(API_PREFIX) else {
        // `$JS.FC.…` (flow-control replies) and the like: nothing to do.
        return;
    };
    let t: Vec<&str> = rest.split('.').collect();
    match t.as_slice() {
        ["INFO"] => answer(delivery, reply, "account_info", Ok(account_info(streams))),
        ["STREAM", "CREATE", name] => stream_create(ctx, reply, name, payload, false),
        ["STREAM", "UPDATE", name] => stream_create(ctx, reply, name, payload, true),
        ["STREAM", "INFO", name] => answer(
            delivery,
            reply,
            "stream_info",
            stream(streams, name).map(|s| stream_info(&s)),
        ),
        ["STREAM", "DELETE", name] => {
            let name = name.to_string();
            on_disk(ctx, reply, "stream_delete", move |s| {
                s.delete(&name)?;
                Ok(json!({"success": true}))
            })
        }
        ["STREAM", "NAMES"] => answer(
            delivery,
            reply,
            "stream_names",
            stream_names(streams, payload, false),
        ),
        ["STREAM", "LIST"] => answer(
            delivery,
            reply,
            "stream_list",
            stream_names(streams, payload, true),
        ),
        ["CONSUMER", "CREATE", stream_name] => {
            consumer_create(ctx, reply, stream_name, None, false, None, payload)
        }
        ["CONSUMER", "CREATE", stream_name, name] => {
            consumer_create(ctx, reply, stream_name, Some(name), false, None, payload)
        }
        ["CONSUMER", "CREATE", stream_name, name, filter @ ..] => {
            let filter = filter.join(".");
            consumer_create(
                ctx,
                reply,
                stream_name,
                Some(name),
                false,
                Some(&filter),
                payload,
            )
        }
        ["CONSUMER", "DURABLE", "CREATE", stream_name, name] => {
            consumer_create(ctx, reply, stream_name, Some(name), true, None, payload)
        }
        ["CONSUMER", "INFO", stream_name, name] => answer(
            delivery,
            reply,
            "consumer_info",
            find_consumer(streams, stream_name, name).map(|c| consumer_info(&c)),
        ),
        ["CONSUMER", "DELETE", stream_name, name]
            if stream(streams, stream_name)
                .ok()
                .and_then(|s| s.consumer(name))
                .is_some_and(|c| c.repl.is_some()) =>
        {
            // Through the stream's group: gone on every replica.
            let s = stream(streams, stream_name);
            let (name, d, reply) = (name.to_string(), delivery.clone(), reply.map(String::from));
            tokio::spawn(async move {
                let r = match s {
                    Ok(s) => consumer::repl::delete(s, name)
                        .await
                        .map(|()| json!({"success": true}))
                        .map_err(JsError::from),
                    Err(e) => Err(e),
                };
                answer(&d, reply.as_deref(), "consumer_delete", r);
            });
        }
        ["CONSUMER", "DELETE", stream_name, name] => {
            let r = stream(streams, stream_name).and_then(|s| {
                consumer::delete(&s, name).map_err(JsError::from)?;
                Ok(json!({"success": true}))
            });
            answer(delivery, reply, "consumer_delete", r)
        }
        ["CONSUMER", "NAMES", stream_name] => answer(
            delivery,
            reply,
            "consumer_names",
            consumer_names(streams, stream_name, payload, false),
        ),
        ["CONSUMER", "LIST", stream_name] => answer(
            delivery,
            reply,
            "consumer_list",
            consumer_names(streams, stream_name, payload, true),
        ),
        ["STREAM", "PURGE", name] => {
            let (name, payload) = (name.to_string(), payload.to_vec());
            on_disk(ctx, reply, "stream_purge", move |streams| {
                let req = purge_from_js(&body(&payload)?)?;
                let n = stream(streams, &name)?
                    .purge(req)
                    .map_err(|e| failed(e, 10110))?;
                Ok(json!({"success": true, "purged": n}))
            })
        }
        ["STREAM", "MSG", "DELETE", name] => {
            let (name, payload) = (name.to_string(), payload.to_vec());
            on_disk(ctx, reply, "stream_msg_delete", move |streams| {
                let seq = msg_delete_from_js(&body(&payload)?)?;
                if stream(streams, &name)?
                    .delete_msg(seq)
                    .map_err(|e| failed(e, 10057))?
                {
                    Ok(json!({"success": true}))
                } else {
                    Err(JsError::new(
                        400,
                        10043,
                        format!("sequence {seq} not found"),
                    ))
                }
            })
        }
        ["STREAM", "MSG", "GET", name] => {
            let (name, payload) = (name.to_string(), payload.to_vec());
            on_disk(ctx, reply, "stream_msg_get", move |streams| {
                let req = body(&payload)?;
                stream_msg_get(&*stream(streams, &name)?, &req)
            })
        }
        ["CONSUMER", "MSG", "NEXT", stream_name, name] => {
            if let Some(reply) = reply {
                next(ctx, stream_name, name, reply, payload);
            }
        }
        _ => {
            let what = t.iter().take(2).cloned().collect::<Vec<_>>().join(".");
            answer(
                delivery,
                reply,
                "error",
                Err(JsError::unsupported(format!(
                    "the API request {what} ($JS.API.{rest})"
                ))),
            )
        }
    }
}

/// A purge's or delete's error: a failing disk is nats-server's
/// `err_code` for the operation (10110 purge, 10057 delete).
fn failed(e: StreamError, err_code: u32) -> JsError {
    match e {
        StreamError::Storage { .. } => JsError::new(500, err_code, e.to_string()),
        e => JsError::from(e),
    }
}

fn stream(streams: &Streams, name: &str) -> Result<Arc<Stream>, JsError> {
    streams.get(name).ok_or_else(JsError::stream_not_found)
}

fn find_consumer(
    streams: &Streams,
    stream_name: &str,
    name: &str,
) -> Result<Arc<Consumer>, JsError> {
    stream(streams, stream_name)?
        .consumer(name)
        .ok_or_else(JsError::consumer_not_found)
}

fn account_info(streams: &Streams) -> Value {
    let list = streams.list();
    let consumers: usize = list.iter().map(|s| s.state.consumers).sum();
    json!({
        "memory": 0,
        "storage": streams.stored_bytes(),
        "streams": list.len(),
        "consumers": consumers,
        "limits": {
            "max_memory": -1,
            "max_storage": -1,
            "max_streams": -1,
            "max_consumers": -1,
            "max_ack_pending": -1,
            "memory_max_stream_bytes": -1,
            "storage_max_stream_bytes": -1,
            "max_bytes_required": false,
        },
        "api": {"total": 0, "errors": 0},
    })
}

fn stream_create(ctx: &Ctx<'_>, reply: Option<&str>, name: &str, payload: &[u8], update: bool) {
    let kind = if update {
        "stream_update"
    } else {
        "stream_create"
    };
    let (v, cfg) = match body(payload).and_then(|v| stream_from_js(name, &v).map(|c| (v, c))) {
        Ok(c) => c,
        Err(e) => return answer(ctx.delivery, reply, kind, Err(e)),
    };
    on_disk(ctx, reply, kind, move |streams| {
        let name = cfg.name.clone();
        if update {
            let old = stream(streams, &name)?.config();
            streams.update(update_config(&old, &v, cfg)?)?;
        } else {
            streams.create(cfg)?;
        }
        Ok(stream_info(&*stream(streams, &name)?))
    });
}

/// What a `STREAM.UPDATE` asks of the stream configured `old`: `cfg` read
/// from the request `v`, with what JetStream's configuration does not say
/// (segment size, fsync interval, and the fsync mode unless the request's
/// metadata names one) kept from `old`. A change of storage type is
/// refused in nats-server's words.
fn update_config(
    old: &StreamConfig,
    v: &Value,
    mut cfg: StreamConfig,
) -> Result<StreamConfig, JsError> {
    let memory = v.get("storage").and_then(Value::as_str) == Some("memory");
    let explicit = v
        .get("metadata")
        .and_then(|m| m.get("sockbus.fsync"))
        .is_some();
    if !explicit {
        if memory != (old.fsync == Fsync::Never) {
            return Err(JsError::new(
                500,
                10052,
                "stream configuration update can not change storage type",
            ));
        }
        cfg.fsync = old.fsync;
    }
    cfg.fsync_interval_ms = old.fsync_interval_ms;
    cfg.segment_bytes = old.segment_bytes;
    Ok(cfg)
}

/// STREAM.NAMES and STREAM.LIST: one page from `offset`, optionally only
/// the stream that captures `subject`.
fn stream_names(streams: &Streams, payload: &[u8], infos: bool) -> Result<Value, JsError> {
    let req = body(payload)?;
    let all: Vec<Arc<Stream>> = match req.get("subject").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => {
            let mut names: Vec<String> =
                streams.list().into_iter().map(|i| i.config.name).collect();
            names.retain(|n| {
                streams.get(n).is_some_and(|st| {
                    st.config().subjects.iter().any(|p| {
                        p == s || sockbus_protocol::matches(p, s) || sockbus_protocol::matches(s, p)
                    })
                })
            });
            names.iter().filter_map(|n| streams.get(n)).collect()
        }
        _ => streams
            .list()
            .into_iter()
            .filter_map(|i| streams.get(&i.config.name))
            .collect(),
    };
    let total = all.len();
    let from = offset(&req);
    let limit = if infos { LIST_PAGE } else { NAMES_PAGE };
    let page = all.iter().skip(from).take(limit);
    Ok(if infos {
        json!({"total": total, "offset": from, "limit": limit,
               "streams": page.map(|s| stream_info(s)).collect::<Vec<_>>(), "missing": []})
    } else {
        json!({"total": total, "offset": from, "limit": limit,
               "streams": page.map(|s| s.name.clone()).collect::<Vec<_>>()})
    })
}

fn consumer_names(
    streams: &Streams,
    stream_name: &str,
    payload: &[u8],
    infos: bool,
) -> Result<Value, JsError> {
    let req = body(payload)?;
    let s = stream(streams, stream_name)?;
    let mut all: Vec<Arc<Consumer>> = s
        .consumers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    let total = all.len();
    let from = offset(&req);
    let limit = if infos { LIST_PAGE } else { NAMES_PAGE };
    let page = all.iter().skip(from).take(limit);
    Ok(if infos {
        json!({"total": total, "offset": from, "limit": limit,
               "consumers": page.map(|c| consumer_info(c)).collect::<Vec<_>>()})
    } else {
        json!({"total": total, "offset": from, "limit": limit,
               "consumers": page.map(|c| c.name.clone()).collect::<Vec<_>>()})
    })
}

fn consumer_create(
    ctx: &Ctx<'_>,
    reply: Option<&str>,
    stream_name: &str,
    name: Option<&str>,
    durable: bool,
    filter: Option<&str>,
    payload: &[u8],
) {
    let r = (|| {
        let req = object(&body(payload)?, "the request")?;
        if let Some(n) = req.get("stream_name").and_then(Value::as_str) {
            if n != stream_name {
                return Err(JsError::new(
                    400,
                    10056,
                    "stream name in subject does not match request",
                ));
            }
        }
        let action = req.get("action").and_then(Value::as_str).unwrap_or("");
        let cfg = req.get("config").cloned().unwrap_or(Value::Null);
        let want = consumer_from_js(&cfg, name, durable, filter)?;
        let s = stream(ctx.streams, stream_name)?;
        let existing = want.name.as_deref().and_then(|n| s.consumer(n));
        match (existing, action) {
            (Some(c), _) if consumer_js_config(&c) == want.js => return Ok(Ok(consumer_info(&c))),
            (Some(_), "create") => {
                return Err(JsError::new(400, 10148, "consumer already exists"));
            }
            (Some(_), _) => {
                return Err(JsError::new(
                    400,
                    10012,
                    "not supported by sockbus: changing a consumer's configuration (delete \
                     and create it again)",
                ));
            }
            (None, "update") => return Err(JsError::new(400, 10149, "consumer does not exist")),
            (None, _) => {}
        }
        let ephemeral_name = if want.cfg.durable.is_none() {
            want.name.clone()
        } else {
            None
        };
        if s.replicas > 1 && want.cfg.durable.is_some() {
            // Its state lives in the stream's Raft log: created through it.
            return Ok(Err((s, want.cfg, want.js)));
        }
        let c = consumer::create_named(&s, want.cfg, ephemeral_name, Some(want.js))?;
        Ok(Ok(consumer_info(&c)))
    })();
    match r {
        Ok(Ok(v)) => answer(ctx.delivery, reply, "consumer_create", Ok(v)),
        Ok(Err((s, cfg, js))) => {
            let (d, reply) = (ctx.delivery.clone(), reply.map(String::from));
            tokio::spawn(async move {
                let r = consumer::repl::create(s, cfg, Some(js))
                    .await
                    .map(|c| consumer_info(&c))
                    .map_err(JsError::from);
                answer(&d, reply.as_deref(), "consumer_create", r);
            });
        }
        Err(e) => answer(ctx.delivery, reply, "consumer_create", Err(e)),
    }
}

/// `CONSUMER.MSG.NEXT`: a number (the batch) or
/// `{"batch","expires","no_wait","max_bytes","idle_heartbeat"}` (ns).
fn next(ctx: &Ctx<'_>, stream_name: &str, name: &str, reply: &str, payload: &[u8]) {
    let c = match find_consumer(ctx.streams, stream_name, name) {
        Ok(c) => c,
        // nats-server has nobody listening for a consumer that does not
        // exist: the client hears "no responders".
        Err(_) => return status(ctx.delivery, reply, 503, "", 0, 0),
    };
    let Some(pull) = read_pull(reply, payload) else {
        return send_status(ctx.delivery, reply, 400, 0, 0);
    };
    pull_js(ctx.delivery, &c, pull);
}

/// Queues a JetStream pull unless the consumer has `max_waiting` already
/// (then 409 Exceeded MaxWaiting).
fn pull_js(d: &Delivery, c: &Consumer, pull: Pull) {
    let max = c
        .nats
        .as_ref()
        .and_then(|v| v.get("max_waiting"))
        .and_then(Value::as_i64)
        .unwrap_or(DEFAULT_MAX_WAITING)
        .max(1) as usize;
    if c.waiting() >= max {
        return status(
            d,
            &pull.reply,
            409,
            "Exceeded MaxWaiting",
            pull.batch,
            pull.max_bytes,
        );
    }
    c.pull_with(pull);
}

fn read_pull(reply: &str, payload: &[u8]) -> Option<Pull> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    let mut pull = Pull {
        reply: reply.to_string(),
        batch: 1,
        max_bytes: usize::MAX,
        // No expiry: the pull waits until it is filled or its client goes.
        expires: Duration::MAX,
        no_wait: false,
        flavor: Flavor::Js,
        heartbeat: None,
        push: false,
        done: None,
        origin: None,
    };
    if text.is_empty() {
        return Some(pull);
    }
    if let Ok(n) = text.parse::<usize>() {
        pull.batch = n.max(1);
        return Some(pull);
    }
    let v: Value = serde_json::from_str(text).ok()?;
    let o = v.as_object()?;
    let num = |k: &str| -> Option<Option<i64>> {
        match o.get(k) {
            None | Some(Value::Null) => Some(None),
            Some(x) => x.as_i64().map(Some),
        }
    };
    let batch = num("batch")?.unwrap_or(1);
    if batch < 1 {
        return None;
    }
    pull.batch = usize::try_from(batch).ok()?;
    if let Some(e) = num("expires")?.filter(|e| *e > 0) {
        pull.expires = Duration::from_nanos(e as u64);
    } else if num("expires")?.is_some_and(|e| e < 0) {
        return None;
    }
    if let Some(b) = num("max_bytes")?.filter(|b| *b > 0) {
        pull.max_bytes = b as usize;
    }
    pull.no_wait = match o.get("no_wait") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return None,
    };
    if let Some(h) = num("idle_heartbeat")?.filter(|h| *h > 0) {
        pull.heartbeat = Some(Duration::from_nanos(h as u64));
    }
    Some(pull)
}

/// An ack: `+ACK` (or empty), `-NAK` (optionally `{"delay": ns}`),
/// `+WPI`, `+TERM` (optionally a reason), `+NXT` (ack, then pull to the
/// reply subject). With a reply subject (and not `+NXT`) the ack is
/// confirmed there once stored.
fn ack(ctx: &Ctx<'_>, subject: &str, reply: Option<&str>, payload: &[u8]) {
    let Some((stream_name, name, seq)) = parse_ack(subject) else {
        return;
    };
    let Ok(c) = find_consumer(ctx.streams, stream_name, name) else {
        return;
    };
    c.touch();
    let text = String::from_utf8_lossy(payload);
    let text = text.trim();
    let (verb, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let ack_all = c
        .nats
        .as_ref()
        .and_then(|v| v.get("ack_policy"))
        .and_then(Value::as_str)
        == Some("all");
    match verb {
        "" | "+ACK" => {
            if ack_all {
                for s in c.pending_upto(seq) {
                    if s != seq {
                        c.ack(s, AckKind::Ack, None);
                    }
                }
            }
            c.ack(seq, AckKind::Ack, reply);
        }
        "-NAK" => {
            let delay = serde_json::from_str::<Value>(rest.trim())
                .ok()
                .and_then(|v| v.get("delay").and_then(Value::as_u64))
                .filter(|d| *d > 0);
            match delay {
                Some(ns) => {
                    c.nak_after(seq, Duration::from_nanos(ns));
                    if let Some(r) = reply {
                        let _ = ctx.delivery.publish_now(r, &[], b"");
                    }
                }
                None => c.ack(seq, AckKind::Nak, reply),
            }
        }
        "+WPI" => c.ack(seq, AckKind::Progress, reply),
        "+TERM" => c.ack(seq, AckKind::Term, reply),
        "+NXT" => {
            c.ack(seq, AckKind::Ack, None);
            if let Some(r) = reply {
                if let Some(p) = read_pull(r, rest.as_bytes()) {
                    pull_js(ctx.delivery, &c, p);
                }
            }
        }
        _ => {}
    }
}
