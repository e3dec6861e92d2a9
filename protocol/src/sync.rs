//! Sync primitives, swapped for loom's under `--cfg sockbus_loom` so the
//! shared-state structures can be model-checked (see tests/loom_outbox.rs).

#[cfg(sockbus_loom)]
pub(crate) use loom::sync::Mutex;
#[cfg(not(sockbus_loom))]
pub(crate) use std::sync::Mutex;

#[cfg(sockbus_loom)]
pub(crate) type MutexGuardCompat<'a, T> = loom::sync::MutexGuard<'a, T>;
#[cfg(not(sockbus_loom))]
pub(crate) type MutexGuardCompat<'a, T> = std::sync::MutexGuard<'a, T>;
