//! The fabric: control and monitoring of hosts over raw Ethernet frames.
//!
//! The MicroVisor has no control domain and no TCP/IP in its management path (seed §2.3, §2.4
//! "Ethernet packet handler"): a controller anywhere on the Ethernet segment controls and
//! monitors every host with raw frames, over a reliability and flow-control protocol "much
//! lighter than TCP". This crate holds:
//!
//! - [`frame`]: the wire format (EtherTypes 0x88B5 control, 0x88B6 monitoring), I/O-free;
//! - [`auth`]: AEAD sealing, key files with epochs, replay windows;
//! - [`channel`]: the reliable channel (seq/ack/SACK, RTO, windows), I/O-free;
//! - [`endpoint`]: discovery, per-peer channels, link supervision, I/O-free;
//! - [`payload`]: HELLO and ACK payloads;
//! - [`control`]: control verbs and exactly-once execution by request id;
//! - [`packet`] and [`node`]: AF_PACKET sockets and the event loop;
//! - [`hotpath`]: a controller and a host joined through memory (the round trip's user-space
//!   work, counted under callgrind by `fabric-bench hot-path`);
//! - [`client`] and [`daemon`]: the controller side and `fabricd`;
//! - [`hostinfo`], [`vm`], [`affinity`]: host information, `vmm` processes, pinning;
//! - [`monitor`] and [`rrd`]: monitoring agent, aggregator, rrdcached client, Prometheus;
//! - [`impair`]: the link impairment forwarder used by the tests (loss, delay, reordering,
//!   duplication) on kernels without `netem`.

pub mod affinity;
pub mod auth;
pub mod channel;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod endpoint;
pub mod frame;
pub mod hostinfo;
pub mod hotpath;
pub mod impair;
pub mod monitor;
pub mod node;
pub mod packet;
pub mod payload;
pub mod rrd;
pub mod vm;

#[cfg(test)]
mod sim;
