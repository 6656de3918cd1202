//! An ATA-over-Ethernet (AoE revision 11) storage target and initiator core.
//!
//! The seed's storage nodes serve every virtual disk as AoE frames with no TCP/IP in the path
//! (MicroVisor §2.4.1, §2.5.1). This crate holds:
//! - [`wire`]: I/O-free checked views of every AoE r11 frame (header, ATA, Query Config,
//!   MAC Mask List, Reserve/Release).

pub mod wire;
