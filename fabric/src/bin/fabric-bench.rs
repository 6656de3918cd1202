//! `fabric-bench`: the baselines the fabric is measured against (raw AF_PACKET, UDP and TCP
//! ping-pong) and the authenticated frame rate. Driven by `fabric/bench.sh`; not part of the
//! test suite.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

use fabric::auth::{self, KeyFile, Keyring, Sealer, Verifier};
use fabric::client::percentile;
use fabric::frame::{AeadAlg, Header, Kind, BROADCAST};
use fabric::hotpath::HotPath;
use fabric::packet::{self, PacketSocket};

/// Baselines for the fabric bench: echo servers and ping clients over raw AF_PACKET, UDP and
/// TCP (64-byte payloads, one request in flight), and authenticated frame rates. Prints JSON.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Echoes raw frames (EtherType 0x88B7, MACs swapped) until killed.
    RawEcho {
        #[arg(long)]
        iface: String,
    },
    /// Raw AF_PACKET ping-pong to an echo server, with a 1 ms retransmission timer.
    RawPing {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value_t = 10_000)]
        count: u64,
    },
    /// UDP echo server on ADDR until killed.
    UdpEcho {
        #[arg(long)]
        addr: String,
    },
    /// UDP ping-pong (1 ms retransmission timer).
    UdpPing {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 10_000)]
        count: u64,
    },
    /// TCP echo server on ADDR until killed.
    TcpEcho {
        #[arg(long)]
        addr: String,
    },
    /// TCP ping-pong (TCP_NODELAY; the kernel retransmits).
    TcpPing {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 10_000)]
        count: u64,
    },
    /// Seals and opens 64-byte frames on one core for SECS seconds (no I/O).
    Crypto {
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
    },
    /// Echo round trips between a controller and a host joined through memory: the user-space
    /// work of `fabric ping` without sockets (count its instructions with callgrind).
    HotPath {
        #[arg(long, default_value_t = 100_000)]
        count: u64,
    },
    /// Sends sealed 64-byte DATA frames as fast as possible for SECS seconds.
    Flood {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
    },
    /// Receives, verifies and counts sealed frames for SECS seconds.
    Sink {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
    },
}

const PAYLOAD: usize = 64;
/// EtherType of the raw ping-pong: not one fabricd listens on, so the two never see each
/// other's frames while both run.
const RAW_ETHERTYPE: u16 = 0x88B7;

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("fabric-bench: {e:#}");
        std::process::exit(1);
    }
}

fn report(kind: &str, lat: &mut [u64], retries: u64) {
    lat.sort_unstable();
    println!(
        "{}",
        json!({
            "kind": kind,
            "count": lat.len(),
            "p50_us": percentile(lat, 0.5),
            "p99_us": percentile(lat, 0.99),
            "max_us": lat.last().copied().unwrap_or(0),
            "retransmits": retries,
        })
    );
}

fn run(a: Args) -> Result<()> {
    match a.cmd {
        Cmd::RawEcho { iface } => {
            // The leanest echo: a blocking recvfrom and a send per frame.
            let s = PacketSocket::open(&iface, RAW_ETHERTYPE)?;
            s.set_blocking(None)?;
            let mut buf = vec![0u8; 2048];
            loop {
                let Some(n) = s.recv_blocking(&mut buf)? else {
                    continue;
                };
                if n < 14 {
                    continue;
                }
                let (dst, src) = (buf[0..6].to_vec(), buf[6..12].to_vec());
                buf[0..6].copy_from_slice(&src);
                buf[6..12].copy_from_slice(&dst);
                s.send(&buf[..n])?;
            }
        }
        Cmd::RawPing { iface, count } => {
            // A send and a blocking recvfrom per round trip; the resend timer is SO_RCVTIMEO
            // (timer wheel, so no hrtimer per wait: 1 ms rounded up to a tick).
            let s = PacketSocket::open(&iface, RAW_ETHERTYPE)?;
            s.set_blocking(Some(Duration::from_millis(1)))?;
            let mut f = vec![0u8; 14 + PAYLOAD];
            f[0..6].copy_from_slice(&BROADCAST);
            f[6..12].copy_from_slice(&s.mac());
            f[12..14].copy_from_slice(&RAW_ETHERTYPE.to_be_bytes());
            let mut buf = vec![0u8; 2048];
            let (mut lat, mut retries) = (Vec::new(), 0);
            for i in 0..count + 1000 {
                f[14..22].copy_from_slice(&i.to_be_bytes());
                let t0 = Instant::now();
                s.send(&f)?;
                loop {
                    match s.recv_blocking(&mut buf)? {
                        Some(n) if n >= 22 && buf[14..22] == i.to_be_bytes() => break,
                        Some(_) => {}
                        None => {
                            retries += 1;
                            s.send(&f)?;
                        }
                    }
                }
                if i >= 1000 {
                    lat.push(t0.elapsed().as_micros() as u64);
                }
            }
            report("raw", &mut lat, retries);
        }
        Cmd::UdpEcho { addr } => {
            let s = UdpSocket::bind(&addr)?;
            let mut buf = [0u8; 2048];
            loop {
                let (n, from) = s.recv_from(&mut buf)?;
                s.send_to(&buf[..n], from)?;
            }
        }
        Cmd::UdpPing { addr, count } => {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(&addr)?;
            let mut f = [0u8; PAYLOAD];
            let mut buf = [0u8; 2048];
            let (mut lat, mut retries) = (Vec::new(), 0);
            for i in 0..count + 1000 {
                f[..8].copy_from_slice(&i.to_be_bytes());
                let t0 = Instant::now();
                s.send(&f)?;
                loop {
                    let ready = packet::wait_readable(
                        &[s.as_raw_fd()],
                        libc::POLLIN,
                        Some(Duration::from_millis(1)),
                    )?;
                    if !ready[0] {
                        retries += 1;
                        s.send(&f)?;
                        continue;
                    }
                    let n = s.recv(&mut buf)?;
                    if n >= 8 && buf[..8] == i.to_be_bytes() {
                        break;
                    }
                }
                if i >= 1000 {
                    lat.push(t0.elapsed().as_micros() as u64);
                }
            }
            report("udp", &mut lat, retries);
        }
        Cmd::TcpEcho { addr } => {
            let l = TcpListener::bind(&addr)?;
            for c in l.incoming() {
                let mut c = c?;
                c.set_nodelay(true)?;
                std::thread::spawn(move || {
                    let mut buf = [0u8; PAYLOAD];
                    while c.read_exact(&mut buf).is_ok() {
                        if c.write_all(&buf).is_err() {
                            break;
                        }
                    }
                });
            }
        }
        Cmd::TcpPing { addr, count } => {
            let mut c = TcpStream::connect(&addr).context("connect")?;
            c.set_nodelay(true)?;
            let mut f = [0u8; PAYLOAD];
            let mut buf = [0u8; PAYLOAD];
            let mut lat = Vec::new();
            for i in 0..count + 1000 {
                f[..8].copy_from_slice(&i.to_be_bytes());
                let t0 = Instant::now();
                c.write_all(&f)?;
                c.read_exact(&mut buf)?;
                if buf[..8] != i.to_be_bytes() {
                    bail!("TCP echo out of step");
                }
                if i >= 1000 {
                    lat.push(t0.elapsed().as_micros() as u64);
                }
            }
            report("tcp", &mut lat, 0);
        }
        Cmd::HotPath { count } => {
            let mut hp = HotPath::new(auth::preferred_alg())?;
            println!("{}", serde_json::to_string(&hp.run(count)?)?);
        }
        Cmd::Crypto { secs } => {
            let keys = Keyring::new(&KeyFile::generate()?);
            for alg in [AeadAlg::Aes256Gcm, AeadAlg::ChaCha20Poly1305] {
                let mut s = Sealer::new(auth::random_id()?, 1, alg);
                let mut v = Verifier::default();
                let (mut n, t0) = (0u64, Instant::now());
                while t0.elapsed().as_secs_f64() < secs {
                    let mut f = s.seal(&keys, 1, BROADCAST, [2; 6], header(), &[7; PAYLOAD])?;
                    v.open(&keys, &mut f)
                        .map_err(|r| anyhow::anyhow!("{r:?}"))?;
                    n += 1;
                }
                let rate = n as f64 / t0.elapsed().as_secs_f64();
                println!(
                    "{}",
                    json!({"kind": "crypto", "alg": alg, "seal_and_open_per_s": rate.round()})
                );
            }
        }
        Cmd::Flood {
            iface,
            key_file,
            secs,
        } => {
            let keys = Keyring::new(&KeyFile::load(&key_file)?);
            let s = PacketSocket::open(&iface, 0x88B5)?;
            let mut sealer = Sealer::new(auth::random_id()?, 1, auth::preferred_alg());
            let (mut n, t0) = (0u64, Instant::now());
            while t0.elapsed().as_secs_f64() < secs {
                let f = sealer.seal(&keys, 1, BROADCAST, s.mac(), header(), &[7; PAYLOAD])?;
                s.send(&f)?;
                n += 1;
            }
            let rate = n as f64 / t0.elapsed().as_secs_f64();
            println!(
                "{}",
                json!({"kind": "flood", "sent": n, "sent_per_s": rate.round()})
            );
        }
        Cmd::Sink {
            iface,
            key_file,
            secs,
        } => {
            let keys = Keyring::new(&KeyFile::load(&key_file)?);
            let s = PacketSocket::open(&iface, 0x88B5)?;
            let mut v = Verifier::default();
            let mut buf = vec![0u8; 2048];
            let (mut ok, mut bad) = (0u64, 0u64);
            let mut first: Option<Instant> = None;
            let mut last = Instant::now();
            let t0 = Instant::now();
            while t0.elapsed().as_secs_f64() < secs {
                packet::wait_readable(
                    &[s.as_raw_fd()],
                    libc::POLLIN,
                    Some(Duration::from_millis(50)),
                )?;
                while let Some(n) = s.recv(&mut buf)? {
                    match v.open(&keys, &mut buf[..n]) {
                        Ok(_) => {
                            ok += 1;
                            last = Instant::now();
                            first.get_or_insert(last);
                        }
                        Err(_) => bad += 1,
                    }
                }
            }
            let span = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
            let rate = if span > 0.0 { ok as f64 / span } else { 0.0 };
            println!(
                "{}",
                json!({"kind": "sink", "verified": ok, "rejected": bad, "verified_per_s": rate.round()})
            );
        }
    }
    Ok(())
}

fn header() -> Header {
    Header {
        kind: Kind::Data,
        aead: AeadAlg::Aes256Gcm,
        flags: 0,
        sender: 0,
        receiver: 0,
        epoch: 0,
        counter: 0,
        seq: 1,
        ack: 1,
        window: 256,
    }
}
