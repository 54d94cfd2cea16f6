//! Layouts shared by observer's kernel programs (`observer-ebpf`) and its daemon (`observer`).
//!
//! Every type here is `#[repr(C)]`, has no `bool` and no implicit padding (the tests at the bottom
//! pin sizes and offsets), so the bytes the kernel writes into the ring buffer decode the same way
//! on both sides. `aya::Pod` impls live behind the `user` feature so the kernel side stays `no_std`
//! without aya.

#![no_std]

pub mod config;
pub mod event;

pub use config::*;
pub use event::*;
