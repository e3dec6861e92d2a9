//! Map keys and values shared with the BPF programs. The one definition
//! lives in `sockmap-ebpf/common/src/abi.rs` (the BPF workspace's `-common`
//! crate); it is included here by path so the root workspace needs nothing
//! from that workspace.

#[path = "../../../sockmap-ebpf/common/src/abi.rs"]
mod shared;
pub use shared::*;

// SAFETY: plain `#[repr(C)]` integers and arrays, no padding, any bit pattern valid.
unsafe impl aya::Pod for SockKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Stats {}

const _: () = assert!(std::mem::size_of::<SockKey>() == 48);
const _: () = assert!(std::mem::size_of::<Stats>() == 72);
// SAFETY: as above (explicit padding fields, no implicit padding).
unsafe impl aya::Pod for DirectPub {}
// SAFETY: as above.
unsafe impl aya::Pod for DirectRoute {}
// SAFETY: as above.
unsafe impl aya::Pod for DirectSub {}
// SAFETY: as above.
unsafe impl aya::Pod for DirectCount {}

const _: () = assert!(std::mem::size_of::<DirectPub>() == 48);
const _: () = assert!(std::mem::size_of::<DirectRoute>() == 184);
