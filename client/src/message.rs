use bytes::Bytes;
use sockbus_protocol::frame::{iter_headers, push_header};

use crate::error::{Error, Result};

/// Message headers: ordered name/value pairs, names may repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    pairs: Vec<(String, String)>,
}

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.pairs.push((name.into(), value.into()));
        self
    }
    /// First value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        let mut b = Vec::new();
        for (k, v) in &self.pairs {
            push_header(&mut b, k, v).map_err(Error::Protocol)?;
        }
        Ok(b)
    }
    pub(crate) fn decode(block: &[u8]) -> Headers {
        Headers {
            pairs: iter_headers(block)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// A message received on a subscription or as a reply.
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) frame: Bytes,
    pub(crate) subject: (usize, usize),
    pub(crate) reply: Option<(usize, usize)>,
    pub(crate) headers: (usize, usize),
    pub payload: Bytes,
    pub(crate) status: u8,
}

impl Message {
    pub fn subject(&self) -> &str {
        // Validated as UTF-8 when the frame was decoded.
        std::str::from_utf8(&self.frame[self.subject.0..self.subject.1]).unwrap_or("")
    }
    pub fn reply(&self) -> Option<&str> {
        self.reply
            .map(|(a, b)| std::str::from_utf8(&self.frame[a..b]).unwrap_or(""))
    }
    /// Headers, decoded on demand (messages without headers cost nothing).
    pub fn headers(&self) -> Headers {
        Headers::decode(&self.frame[self.headers.0..self.headers.1])
    }
    pub fn has_headers(&self) -> bool {
        self.headers.0 != self.headers.1
    }
    pub(crate) fn is_no_responders(&self) -> bool {
        self.status & sockbus_protocol::frame::MSG_NO_RESPONDERS != 0
    }
}
