//! Types shared by the sockbus BPF programs (`sockbus-ebpf`) and their
//! loader (the broker's `accel` module, which includes `abi.rs` by path so
//! the root workspace never depends on this BPF workspace).
#![no_std]

mod abi;
pub use abi::*;
