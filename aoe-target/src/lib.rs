//! An ATA-over-Ethernet (AoE revision 11) storage target and initiator core.
//!
//! The seed's storage nodes serve every virtual disk as AoE frames with no TCP/IP in the path
//! (MicroVisor §2.4.1, §2.5.1); overcommitted datastores are thin provisioned (§3.5). This
//! crate holds:
//! - [`wire`]: I/O-free checked views of every AoE r11 frame (header, ATA, Query Config,
//!   MAC Mask List, Reserve/Release).
//! - [`engine`]: the target's command engine, generic over its I/O (sans-I/O).
//! - [`thin`]: the persistent written-block map with per-block write generations.
//! - [`initiator`]: the initiator core (discovery, window, RTT-based retransmit).
//! - [`store`] and [`config`]: backing stores (raw, thin, thick) and their options.
//! - [`server`]: the AF_PACKET + io_uring event loop of the `aoe-target` binary, over the
//!   fd wrappers in [`sys`], [`uring`], [`mapped`] (page-cache reads sent from a mapping of
//!   the backing file) and [`pring`] (the PACKET_MMAP receive ring).

pub mod buf;
pub mod config;
pub mod engine;
pub mod initiator;
pub mod mapped;
pub mod pring;
pub mod ratelimit;
pub mod server;
pub mod store;
pub mod sys;
pub mod thin;
pub mod uring;
pub mod wire;

pub use buf::FrameBuf;
pub use engine::{
    Action, Engine, ExportSpec, ExportStats, ExportStatus, IoOp, IoRequest, IoTarget, MemBackend,
};
pub use thin::ThinMap;
