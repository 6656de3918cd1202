//! The fabric: control and monitoring of hosts over raw Ethernet frames.
//!
//! The MicroVisor has no control domain and no TCP/IP in its management path (seed §2.3, §2.4
//! "Ethernet packet handler"): a controller anywhere on the Ethernet segment controls and
//! monitors every host with raw frames, over a reliability and flow-control protocol "much
//! lighter than TCP". This crate holds:
//!
//! - [`frame`]: the wire format (EtherTypes 0x88B5 control, 0x88B6 monitoring), I/O-free;
//! - [`auth`]: AEAD sealing, key files with epochs, replay windows;

pub mod auth;
pub mod channel;
pub mod control;
pub mod endpoint;
pub mod frame;
pub mod hostinfo;
pub mod payload;
pub mod vm;

#[cfg(test)]
mod sim;
