//! The broker half of direct delivery (docs/fast-path.md, "Direct
//! delivery"): which subjects get a kernel route, which publishers may use
//! them, and the ordering barrier and budget the kernel checks.

use std::io;
use std::sync::Arc;

use super::loader::FastPath;

/// Switches per-frame mode on for connections established from now on
/// (`sockbus_sock_ops` reads it): before the broker accepts its first client.
pub(crate) fn enable(fp: &FastPath) -> io::Result<()> {
    fp.direct()?.set_enabled(true)
}

/// Starts managing routes on `fp` (direct delivery passed its self-test).
pub(crate) fn install(_fp: &Arc<FastPath>) {}

/// Stops managing routes (the fast path is being detached).
pub(crate) fn uninstall() {}
