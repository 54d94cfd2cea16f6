//! Layouts shared by observer's kernel programs (`observer-ebpf`) and its daemon (`observer`):
//!
//! * [`event`]: the event layouts, the [`SocketEvent`] written into the ring buffer and the
//!   [`SocketInfo`] kept per socket;
//! * [`probe`]: the probe metadata, [`ProbeId`] (the program that emitted an event, its name,
//!   attach point, back end and hook) with [`Hook`], [`Backend`] and [`AttachPoint`];
//! * [`config`]: the [`ProbeConfig`] the daemon hands the programs at load time (record and
//!   struct offsets, argument positions) and the per-CPU [`counter`] indices.
//!
//! Everything is re-exported at the crate root (`observer_common::ProbeId`, ...).
//!
//! Every type that crosses between the two sides is `#[repr(C)]`, has no `bool` and no implicit
//! padding (the tests in each module pin sizes and offsets), so the bytes the kernel writes into
//! the ring buffer and the maps decode the same way on both sides. `aya::Pod` impls live behind
//! the `user` feature so the kernel side stays `no_std` without aya.

#![no_std]

pub mod config;
pub mod event;
pub mod probe;

pub use config::*;
pub use event::*;
pub use probe::*;
