//! One module per subcommand of `sockbus-loadtest`.

pub mod ceiling;
pub mod cluster;
pub mod compare;
pub mod run;
pub mod sub_memory;

use std::time::Duration;

/// `5s`, `500ms`, `2m`, `1m30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}; examples: 5s, 500ms, 2m)"))
}
