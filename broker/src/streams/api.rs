//! The stream API over request/reply on reserved subjects, the way NATS
//! JetStream does it. The delivery engine hands every native PUB to `$SB.>`
//! here (the HTTP gateway refuses them) and this module answers it. The
//! subjects (their table is in `sockbus_protocol::api::subject`) and the
//! JSON bodies of requests and replies are defined once, in
//! `sockbus_protocol::api`, for the broker and the SDK alike; this module
//! only dispatches them.
//!
//! Errors are `{"error": "...", "status": N}` with an HTTP-style status.
//! Request bodies are read strictly (see [`super::strict`]): a field the
//! broker does not know is refused, naming it.

use std::sync::Arc;

use serde::Serialize;
use sockbus_protocol::api::subject::{self, Api};
use sockbus_protocol::api::{
    ApiError, ConsumerList, Deleted, Purged, StreamInfo, StreamList, StreamListRequest,
};
use sockbus_protocol::subject::validate_subject;

use super::consumer::{self, AckKind, ConsumerConfig, PullRequest};
use super::{strict, Streams};
use super::{PurgeRequest, StreamConfig, StreamError};
use crate::deliver::Delivery;

/// What the API needs of the broker: the streams, and a way to answer.
struct Ctx<'a> {
    streams: &'a Arc<Streams>,
    delivery: &'a Delivery,
}

pub fn error_body(e: &StreamError) -> Vec<u8> {
    serde_json::to_vec(&ApiError {
        error: e.to_string(),
        status: e.status(),
    })
    .expect("serialisable")
}

fn reply_with<T: Serialize>(state: &Ctx<'_>, reply: Option<&str>, r: Result<T, StreamError>) {
    let Some(reply) = reply else { return };
    let mut body = match r {
        Ok(v) => serde_json::to_vec(&v).expect("serialisable"),
        Err(e) => error_body(&e),
    };
    // An answer that cannot be delivered would leave the requester waiting
    // until its timeout: it gets this error instead (STREAM.LIST of many
    // streams, which could grow that large, comes in pages instead).
    let max = state.delivery.max_payload();
    if body.len() > max {
        body = error_body(&StreamError::AnswerTooLarge {
            size: body.len(),
            max,
            hint: "raise --max-payload",
        });
    }
    let _ = state.delivery.publish_now(reply, &[], &body);
}

/// Room left in a page for `{"streams":[],"total":..,"offset":..}` and
/// the reply's frame.
const PAGE_SLACK: usize = 256;

/// The page of `all` (sorted by name) starting at `offset`: as many streams
/// as fit in `max_payload` bytes of JSON, and always at least one, so a
/// client paging through never stalls (a single stream's info larger than
/// the payload is answered 413 by [`reply_with`]).
fn page(all: Vec<StreamInfo>, offset: u64, max_payload: usize) -> StreamList {
    let total = all.len() as u64;
    let budget = max_payload.saturating_sub(PAGE_SLACK);
    let mut used = 0;
    let mut streams = Vec::new();
    for info in all
        .into_iter()
        .skip(usize::try_from(offset).unwrap_or(usize::MAX))
    {
        let len = serde_json::to_vec(&info).map_or(0, |v| v.len()) + 1;
        if !streams.is_empty() && used + len > budget {
            break;
        }
        used += len;
        streams.push(info);
    }
    StreamList {
        streams,
        total: Some(total),
        offset: Some(offset),
    }
}

/// Runs `f` (file-system work with fsyncs: creating, deleting a stream)
/// on the runtime's blocking pool and answers when it is done, so the
/// connection's reader and the runtime's workers never wait on the disk.
/// Without a runtime (some unit tests) it runs here.
fn on_disk<T, F>(state: &Ctx<'_>, reply: Option<&str>, f: F)
where
    T: Serialize + Send + 'static,
    F: FnOnce(&Streams) -> Result<T, StreamError> + Send + 'static,
{
    let streams = state.streams.clone();
    let delivery = state.delivery.clone();
    let reply = reply.map(str::to_string);
    let job = move || {
        let r = f(&streams);
        let ctx = Ctx {
            streams: &streams,
            delivery: &delivery,
        };
        reply_with(&ctx, reply.as_deref(), r);
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(job)),
        Err(_) => job(),
    }
}

/// Answers once `f` is done (a replicated consumer's create or delete,
/// which waits for its stream's group).
fn later<T, F>(state: &Ctx<'_>, reply: Option<&str>, f: F)
where
    T: Serialize + Send + 'static,
    F: std::future::Future<Output = Result<T, StreamError>> + Send + 'static,
{
    let streams = state.streams.clone();
    let delivery = state.delivery.clone();
    let reply = reply.map(str::to_string);
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let r = f.await;
        let ctx = Ctx {
            streams: &streams,
            delivery: &delivery,
        };
        reply_with(&ctx, reply.as_deref(), r);
    });
}

fn parse<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> Result<T, StreamError> {
    strict::from_slice(if payload.is_empty() { b"{}" } else { payload })
        .map_err(|e| StreamError::BadRequest(format!("invalid request body: {e}")))
}

/// A stream configuration in a create or update request, read strictly;
/// its name is the subject's (and must match one in the body).
fn stream_config(name: &str, payload: &[u8]) -> Result<StreamConfig, StreamError> {
    let mut v = parse::<serde_json::Value>(payload)?;
    if let Some(o) = v.as_object_mut() {
        o.entry("name")
            .or_insert_with(|| serde_json::Value::String(name.to_string()));
    }
    let cfg: StreamConfig = strict::from_value(v)
        .map_err(|e| StreamError::BadRequest(format!("invalid stream configuration: {e}")))?;
    if cfg.name != name {
        return Err(StreamError::BadRequest(format!(
            "stream name {:?} in the body does not match {name:?} in the subject",
            cfg.name
        )));
    }
    Ok(cfg)
}

/// Handles a PUB to a `$SB.` subject (never routed to subscribers).
pub(crate) fn handle(
    streams: &Arc<Streams>,
    delivery: &Delivery,
    subject: &str,
    reply: Option<&str>,
    payload: &[u8],
) {
    let state = &Ctx { streams, delivery };
    if subject.starts_with(subject::ACK_PREFIX) {
        let r = ack(state, subject, payload, reply);
        if let Err(e) = r {
            reply_with::<()>(state, reply, Err(e));
        }
        return;
    }
    let Some(request) = Api::parse(subject) else {
        reply_with::<()>(
            state,
            reply,
            Err(StreamError::BadRequest(format!(
                "unknown API subject {subject:?}"
            ))),
        );
        return;
    };
    let streams = &state.streams;
    match request {
        Api::StreamCreate { stream: name } => match stream_config(name, payload) {
            Ok(cfg) => on_disk(state, reply, move |s| s.create(cfg)),
            Err(e) => reply_with::<()>(state, reply, Err(e)),
        },
        Api::StreamUpdate { stream: name } => match stream_config(name, payload) {
            Ok(cfg) => on_disk(state, reply, move |s| s.update(cfg)),
            Err(e) => reply_with::<()>(state, reply, Err(e)),
        },
        Api::StreamPurge { stream: name } => {
            let name = name.to_string();
            match parse::<PurgeRequest>(payload) {
                Ok(req) => on_disk(state, reply, move |s| {
                    let st = s
                        .get(&name)
                        .ok_or_else(|| StreamError::NotFound(name.clone()))?;
                    st.purge(req).map(|purged| Purged { purged })
                }),
                Err(e) => reply_with::<()>(state, reply, Err(e)),
            }
        }
        Api::StreamInfo { stream: name } => reply_with(state, reply, streams.info(name)),
        Api::StreamReplacePeer { stream: name } => {
            let name = name.to_string();
            match parse::<sockbus_protocol::api::ReplacePeer>(payload) {
                Ok(req) => on_disk(state, reply, move |s| {
                    s.replace_peer(&name, &req.old, &req.new)
                }),
                Err(e) => reply_with::<()>(state, reply, Err(e)),
            }
        }
        Api::StreamDelete { stream: name } => {
            let name = name.to_string();
            on_disk(state, reply, move |s| {
                s.delete(&name).map(|_| Deleted { deleted: true })
            })
        }
        Api::StreamList => {
            let r = parse::<StreamListRequest>(payload).and_then(|req| {
                match req.subject {
                    None => Ok(page(
                        streams.list(),
                        req.offset.unwrap_or(0),
                        state.delivery.max_payload(),
                    )),
                    // The stream a publish to this subject would be stored
                    // by, by the rule the publish path itself follows.
                    Some(s) => {
                        validate_subject(&s).map_err(|e| StreamError::BadRequest(e.to_string()))?;
                        Ok(StreamList {
                            streams: streams.capture(&s).map(|s| s.info()).into_iter().collect(),
                            total: None,
                            offset: None,
                        })
                    }
                }
            });
            reply_with(state, reply, r)
        }
        Api::ConsumerCreate { stream } => {
            let r = parse::<ConsumerConfig>(payload).and_then(|cfg| {
                let s = streams
                    .get(stream)
                    .ok_or_else(|| StreamError::NotFound(stream.to_string()))?;
                Ok((s, cfg))
            });
            match r {
                // Its state lives in the stream's Raft log.
                Ok((s, cfg)) if s.replicas > 1 && cfg.durable.is_some() => {
                    later(state, reply, async move {
                        consumer::repl::create(s, cfg, None).await.map(|c| c.info())
                    })
                }
                Ok((s, cfg)) => reply_with(state, reply, consumer::create(&s, cfg)),
                Err(e) => reply_with::<()>(state, reply, Err(e)),
            }
        }
        Api::ConsumerInfo {
            stream,
            consumer: name,
        } => {
            let r = streams
                .get(stream)
                .ok_or_else(|| StreamError::NotFound(stream.to_string()))
                .and_then(|s| {
                    s.consumer(name)
                        .ok_or_else(|| StreamError::ConsumerNotFound(name.to_string()))
                })
                .map(|c| c.info());
            reply_with(state, reply, r)
        }
        Api::ConsumerDelete {
            stream,
            consumer: name,
        } => {
            let s = streams
                .get(stream)
                .ok_or_else(|| StreamError::NotFound(stream.to_string()));
            match s {
                Ok(s) if s.consumer(name).is_some_and(|c| c.repl.is_some()) => {
                    let name = name.to_string();
                    later(state, reply, async move {
                        consumer::repl::delete(s, name)
                            .await
                            .map(|_| Deleted { deleted: true })
                    })
                }
                s => {
                    let r = s
                        .and_then(|s| consumer::delete(&s, name))
                        .map(|_| Deleted { deleted: true });
                    reply_with(state, reply, r)
                }
            }
        }
        Api::ConsumerList { stream } => {
            let r = streams
                .get(stream)
                .ok_or_else(|| StreamError::NotFound(stream.to_string()))
                .map(|s| ConsumerList {
                    consumers: s.consumer_infos(usize::MAX),
                });
            reply_with(state, reply, r)
        }
        Api::ConsumerNext {
            stream,
            consumer: name,
        } => {
            let Some(reply) = reply else { return };
            let r = parse::<PullRequest>(payload).and_then(|p| {
                let s = streams
                    .get(stream)
                    .ok_or_else(|| StreamError::NotFound(stream.to_string()))?;
                let c = s
                    .consumer(name)
                    .ok_or_else(|| StreamError::ConsumerNotFound(name.to_string()))?;
                c.pull(reply, p);
                Ok(())
            });
            if let Err(e) = r {
                consumer::send_status(state.delivery, reply, e.status(), &e.to_string(), 0);
            }
        }
    }
}

fn ack(
    state: &Ctx<'_>,
    subject: &str,
    payload: &[u8],
    reply: Option<&str>,
) -> Result<(), StreamError> {
    let subject::Ack {
        stream,
        consumer: name,
        seq,
        ..
    } = subject::parse_ack(subject)
        .ok_or_else(|| StreamError::BadRequest("malformed ack subject".into()))?;
    let kind = AckKind::from_payload(payload).ok_or_else(|| {
        StreamError::BadRequest("unknown ack kind (use +ACK, -NAK, +WPI or +TERM)".into())
    })?;
    let s = state
        .streams
        .get(stream)
        .ok_or_else(|| StreamError::NotFound(stream.to_string()))?;
    let c = s
        .consumer(name)
        .ok_or_else(|| StreamError::ConsumerNotFound(name.to_string()))?;
    c.ack(seq, kind, reply);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::testing::{delivery, Inbox};

    /// Sends one API request and returns its answer.
    async fn request(
        streams: &Arc<Streams>,
        d: &Delivery,
        subject: &str,
        body: &str,
    ) -> serde_json::Value {
        let inbox = Inbox::new(d, "_INBOX.api.1");
        handle(streams, d, subject, Some(&inbox.subject), body.as_bytes());
        let got = inbox.next().await;
        assert_eq!(got.len(), 1, "one answer");
        serde_json::from_slice(&got[0].payload).unwrap()
    }

    fn refused(answer: &serde_json::Value) -> (&str, u64) {
        (
            answer["error"].as_str().expect("an error answer"),
            answer["status"].as_u64().unwrap(),
        )
    }

    #[tokio::test]
    async fn a_stream_create_naming_an_unknown_field_is_refused_with_the_field_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = delivery();
        let streams = Arc::new(Streams::open(dir.path(), d.clone(), None).unwrap());
        let create = subject::stream_create("ORDERS");
        let a = request(
            &streams,
            &d,
            &create,
            r#"{"subjects":["orders.>"],"max_msg":10}"#,
        )
        .await;
        assert_eq!(
            refused(&a),
            (
                "invalid stream configuration: unknown field `max_msg`, expected one of `name`, \
                 `subjects`, `fsync`, `fsync_interval_ms`, `max_age_ms`, `max_bytes`, `max_msgs`, \
                 `segment_bytes`, `duplicate_window_ms`, `replicas`, `max_msg_size`, `description`",
                400
            )
        );
        assert!(streams.get("ORDERS").is_none(), "nothing created");
        let a = request(
            &streams,
            &d,
            &create,
            r#"{"subjects":["orders.>"],"max_msgs":10}"#,
        )
        .await;
        assert_eq!(a["config"]["max_msgs"], 10, "{a}");
    }

    #[tokio::test]
    async fn a_consumer_create_naming_an_unknown_field_is_refused_with_the_field_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = delivery();
        let streams = Arc::new(Streams::open(dir.path(), d.clone(), None).unwrap());
        streams
            .create(StreamConfig::new("ORDERS", ["orders.>"]))
            .unwrap();
        let create = subject::consumer_create("ORDERS");
        let a = request(&streams, &d, &create, r#"{"durable":"w","ack_wait":5}"#).await;
        assert_eq!(
            refused(&a),
            (
                "invalid request body: unknown field `ack_wait`, expected one of `durable`, \
                 `start`, `filter_subject`, `ack_policy`, `ack_wait_ms`, `max_deliver`, \
                 `max_ack_pending`, `inactive_ms` at line 1 column 25",
                400
            )
        );
        assert!(streams.get("ORDERS").unwrap().consumer("w").is_none());
        let a = request(&streams, &d, &create, r#"{"durable":"w","ack_wait_ms":5}"#).await;
        assert_eq!(a["config"]["ack_wait_ms"], 5, "{a}");
    }

    #[tokio::test]
    async fn a_stream_list_larger_than_the_max_payload_comes_in_pages_that_cover_every_stream() {
        let dir = tempfile::tempdir().unwrap();
        let d = crate::deliver::Delivery::new(
            crate::router::Router::default(),
            Default::default(),
            4096,
            64 << 20,
            0,
        );
        let streams = Arc::new(Streams::open(dir.path(), d.clone(), None).unwrap());
        for i in 0..30 {
            streams
                .create(StreamConfig::new(format!("S{i}"), [format!("s.{i}")]))
                .unwrap();
        }
        let mut names = Vec::new();
        let mut pages = 0;
        loop {
            let body = format!(r#"{{"offset":{}}}"#, names.len());
            let a = request(&streams, &d, subject::STREAM_LIST, &body).await;
            assert_eq!(a["total"], 30, "{a}");
            assert_eq!(a["offset"], names.len(), "{a}");
            let page = a["streams"].as_array().expect("a page of streams").clone();
            assert!(
                !page.is_empty(),
                "a page short of the total is never empty: {a}"
            );
            assert!(a.to_string().len() <= 4096, "a page fits the max payload");
            names.extend(
                page.iter()
                    .map(|s| s["config"]["name"].as_str().unwrap().to_string()),
            );
            pages += 1;
            if names.len() >= 30 {
                break;
            }
        }
        assert!(pages > 1, "30 streams do not fit 4 KiB: more than one page");
        let mut want: Vec<String> = (0..30).map(|i| format!("S{i}")).collect();
        want.sort();
        assert_eq!(names, want, "every stream once, in name order");
        // Past the end: an empty page, still with the total.
        let a = request(&streams, &d, subject::STREAM_LIST, r#"{"offset":30}"#).await;
        assert_eq!(
            (a["streams"].as_array().unwrap().len(), &a["total"]),
            (0, &30.into())
        );
        // One stream by subject still fits.
        let a = request(&streams, &d, subject::STREAM_LIST, r#"{"subject":"s.7"}"#).await;
        assert_eq!(a["streams"][0]["config"]["name"], "S7", "{a}");
    }
}
