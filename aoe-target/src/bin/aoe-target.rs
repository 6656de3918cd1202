//! `aoe-target`: serve files or block devices as ATA-over-Ethernet disks.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use aoe_target::config::{ExportOptions, TargetOptions, DEFAULT_BUFCNT};
use aoe_target::server::Server;
use clap::Parser;

/// Serve a file or block device as an ATA-over-Ethernet (AoE r11) disk.
///
/// One export from flags:
///   aoe-target --iface eth0 --shelf 7 --slot 1 --file /srv/disk.img
///
/// A thin export of 100 GiB backed by a sparse file and a written-block map (<file>.aoemap):
///   aoe-target --iface eth0 --shelf 7 --slot 1 --file /srv/thin.img --thin 100G
///
/// Several exports from a TOML file (see the crate README):
///   aoe-target --config /etc/aoe-target.toml
///
/// Writes are acknowledged only once durable (O_DIRECT + O_DSYNC), because Linux's aoe driver
/// treats the disk as write-through and never flushes; --writeback acknowledges from the page
/// cache instead. SIGTERM or SIGINT drains every request in flight and exits.
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// TOML file with the interface and any number of exports (excludes the export flags).
    #[arg(long, conflicts_with_all = ["iface", "shelf", "slot", "file"])]
    config: Option<PathBuf>,
    /// Network interface to serve on.
    #[arg(long, required_unless_present = "config")]
    iface: Option<String>,
    /// Shelf (major) address, 0-65534.
    #[arg(long, required_unless_present = "config")]
    shelf: Option<u16>,
    /// Slot (minor) address, 0-254.
    #[arg(long, required_unless_present = "config")]
    slot: Option<u8>,
    /// Backing file or block device.
    #[arg(long, required_unless_present = "config")]
    file: Option<PathBuf>,
    /// Thin export advertising SIZE (e.g. 100G): a sparse file plus a persistent map of
    /// written blocks with a write generation per block; may exceed the space available.
    #[arg(long, value_name = "SIZE")]
    thin: Option<String>,
    /// Allocate the whole advertised size on disk up front.
    #[arg(long)]
    thick: bool,
    /// Serve through the page cache (no O_DIRECT) and acknowledge writes once they are in it
    /// (faster, not crash-safe; FLUSH CACHE still syncs).
    #[arg(long)]
    writeback: bool,
    /// Buffer count to advertise; requests beyond it in flight are dropped.
    #[arg(long, default_value_t = DEFAULT_BUFCNT)]
    bufcnt: u16,
    /// Initial config string (AoE Query Config).
    #[arg(long, default_value = "")]
    config_string: String,
    /// MAC mask list: only these initiators are served (comma separated).
    #[arg(long, value_delimiter = ',')]
    mask: Vec<String>,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Do not open the backing store with O_DIRECT.
    #[arg(long)]
    buffered: bool,
    /// Thin map file (default <file>.aoemap).
    #[arg(long)]
    map: Option<PathBuf>,
    /// Thin map block size (granularity of the written-block map).
    #[arg(long, default_value = "64K")]
    block_size: String,
    /// Write the status JSON here every second and at exit.
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// How long to wait for another target answering our shelf.slot (0 skips the check).
    #[arg(long, default_value_t = 500)]
    probe_ms: u64,
    /// Print the start-up and final status as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn options(a: &Args) -> anyhow::Result<TargetOptions> {
    let mut opts = match &a.config {
        Some(path) => TargetOptions::from_file(path)?,
        None => TargetOptions {
            interface: a.iface.clone().unwrap_or_default(),
            status_file: None,
            exports: vec![ExportOptions {
                shelf: a.shelf.unwrap_or_default(),
                slot: a.slot.unwrap_or_default(),
                file: a.file.clone().unwrap_or_default(),
                thin: a.thin.clone(),
                thick: a.thick,
                writeback: a.writeback,
                bufcnt: a.bufcnt,
                config: a.config_string.clone(),
                masks: a.mask.clone(),
                read_only: a.read_only,
                buffered: a.buffered,
                map: a.map.clone(),
                block_size: a.block_size.clone(),
            }],
        },
    };
    if a.status_file.is_some() {
        opts.status_file = a.status_file.clone();
    }
    opts.validate()?;
    Ok(opts)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let opts = match options(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("aoe-target: {e:#}");
            return ExitCode::from(2);
        }
    };
    let server = match Server::open(&opts, Duration::from_millis(args.probe_ms)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("aoe-target: {:#}", anyhow::Error::from(e));
            return ExitCode::from(1);
        }
    };
    let status = server.status();
    if args.json {
        println!("{status}");
    } else {
        for e in status["exports"].as_array().into_iter().flatten() {
            println!(
                "aoe-target: serving {} on {} ({}, MTU {}): {} bytes advertised, {} used{}{}",
                e["name"].as_str().unwrap_or("?"),
                opts.interface,
                server.mac(),
                server.mtu(),
                e["advertised_bytes"],
                e["used_bytes"],
                if e["thin_map"] == true { ", thin" } else { "" },
                if e["writeback"] == true {
                    ", writeback"
                } else {
                    ", durable acks"
                },
            );
        }
    }
    match server.run() {
        Ok(last) => {
            if args.json {
                println!("{last}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aoe-target: {:#}", anyhow::Error::from(e));
            ExitCode::from(1)
        }
    }
}
