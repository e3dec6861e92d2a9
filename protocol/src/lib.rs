//! The sockbus wire protocol, sans-IO: bytes in, frames out. No runtime, no
//! sockets, so every protocol case is a plain unit test and the decoder can
//! be fuzzed. See docs/protocol.md for the byte layout. (The one exception,
//! the optional busy-poll task behind feature `rt`, lives in [`busy_poll`].)
//! The durable-stream API's JSON types and `$SB.` subjects, shared by the
//! broker and the SDK, are in [`api`].

pub mod api;
pub mod backoff;
pub mod busy_poll;
pub mod credentials;
#[cfg(feature = "rt")]
pub mod drain;
pub mod flow;
pub mod frame;
pub mod nats;
pub mod outbox;
pub mod owned;
pub mod subject;
mod sync;

pub use backoff::Backoff;
pub use credentials::Credentials;
pub use frame::{
    code, decode, decode_body, parse_header, FrameRef, Header, Kind, ProtocolError, HEADER_LEN,
    MAX_FRAME_OVERHEAD, PROTOCOL_VERSION,
};
pub use owned::Frame;
pub use subject::{matches, validate_pattern, validate_subject, SubjectError};

/// Default largest payload the broker accepts: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: u32 = 1024 * 1024;
