//! An owned frame, for callers that keep frames around (tests, tools) rather
//! than decode them in place.

use bytes::BufMut;

use crate::frame::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Connect {
        flags: u8,
        recv_window: u32,
        name: String,
        token: Vec<u8>,
    },
    Info {
        flags: u8,
        recv_window: u32,
        max_payload: u32,
        server_name: String,
    },
    Pub {
        flags: u8,
        subject: String,
        reply: Option<String>,
        headers: Vec<u8>,
        payload: Vec<u8>,
    },
    Sub {
        sid: u32,
        subject: String,
        queue: Option<String>,
    },
    Unsub {
        sid: u32,
        max: u32,
    },
    Msg {
        sid: u32,
        flags: u8,
        subject: String,
        reply: Option<String>,
        headers: Vec<u8>,
        payload: Vec<u8>,
    },
    Ping(u64),
    Pong(u64),
    Err {
        code: u16,
        text: String,
    },
    Credit(u32),
    RMsg {
        flags: u8,
        subject: String,
        reply: Option<String>,
        queues: Vec<String>,
        headers: Vec<u8>,
        payload: Vec<u8>,
    },
}

impl Frame {
    pub fn encode(&self, dst: &mut impl BufMut) -> Result<(), ProtocolError> {
        match self {
            Frame::Connect {
                flags,
                recv_window,
                name,
                token,
            } => encode_connect(dst, *flags, *recv_window, name, token)?,
            Frame::Info {
                flags,
                recv_window,
                max_payload,
                server_name,
            } => encode_info_flags(dst, *flags, *recv_window, *max_payload, server_name)?,
            Frame::Pub {
                flags,
                subject,
                reply,
                headers,
                payload,
            } => encode_pub_flags(dst, *flags, subject, reply.as_deref(), headers, payload)?,
            Frame::Sub {
                sid,
                subject,
                queue,
            } => encode_sub(dst, *sid, subject, queue.as_deref())?,
            Frame::Unsub { sid, max } => encode_unsub(dst, *sid, *max),
            Frame::Msg {
                sid,
                flags,
                subject,
                reply,
                headers,
                payload,
            } => encode_msg(
                dst,
                *sid,
                *flags,
                subject,
                crate::subject::subject_hash(subject.as_bytes()),
                reply.as_deref(),
                headers,
                payload,
            ),
            Frame::Ping(id) => encode_ping(dst, *id),
            Frame::Pong(id) => encode_pong(dst, *id),
            Frame::Err { code, text } => encode_err(dst, *code, text),
            Frame::Credit(n) => encode_credit(dst, *n),
            Frame::RMsg {
                flags,
                subject,
                reply,
                queues,
                headers,
                payload,
            } => {
                let qs: Vec<&str> = queues.iter().map(String::as_str).collect();
                encode_rmsg(
                    dst,
                    *flags,
                    subject,
                    crate::subject::subject_hash(subject.as_bytes()),
                    reply.as_deref(),
                    &qs,
                    headers,
                    payload,
                )
            }
        }
        Ok(())
    }
}

impl From<FrameRef<'_>> for Frame {
    fn from(f: FrameRef<'_>) -> Frame {
        match f {
            FrameRef::Connect {
                flags,
                recv_window,
                name,
                token,
                ..
            } => Frame::Connect {
                flags,
                recv_window,
                name: name.into(),
                token: token.into(),
            },
            FrameRef::Info {
                flags,
                recv_window,
                max_payload,
                server_name,
                ..
            } => Frame::Info {
                flags,
                recv_window,
                max_payload,
                server_name: server_name.into(),
            },
            FrameRef::Pub {
                flags,
                subject,
                reply,
                headers,
                payload,
            } => Frame::Pub {
                flags,
                subject: subject.into(),
                reply: reply.map(Into::into),
                headers: headers.into(),
                payload: payload.into(),
            },
            FrameRef::Sub {
                sid,
                subject,
                queue,
            } => Frame::Sub {
                sid,
                subject: subject.into(),
                queue: queue.map(Into::into),
            },
            FrameRef::Unsub { sid, max } => Frame::Unsub { sid, max },
            FrameRef::Msg {
                sid,
                flags,
                subject,
                reply,
                headers,
                payload,
            } => Frame::Msg {
                sid,
                flags,
                subject: subject.into(),
                reply: reply.map(Into::into),
                headers: headers.into(),
                payload: payload.into(),
            },
            FrameRef::Ping(id) => Frame::Ping(id),
            FrameRef::Pong(id) => Frame::Pong(id),
            FrameRef::Err { code, text } => Frame::Err {
                code,
                text: text.into(),
            },
            FrameRef::Credit(n) => Frame::Credit(n),
            FrameRef::RMsg {
                flags,
                subject,
                reply,
                queues,
                headers,
                payload,
            } => Frame::RMsg {
                flags,
                subject: subject.into(),
                reply: reply.map(Into::into),
                queues: iter_queues(queues).map(Into::into).collect(),
                headers: headers.into(),
                payload: payload.into(),
            },
        }
    }
}
