//! A client for Debian's `rrdcached` over its UNIX socket (fabric-anchors §3.3, §3.7): CREATE
//! with `-O`, UPDATEs in BATCH, FETCH for queries. While the daemon is unreachable, commands
//! are buffered (bounded) and sent in order once it answers again.
//!
//! Written here rather than using `rrdcached-client` because that crate is async (tokio) and
//! the daemon is a single-threaded poll loop; the line protocol needs ~150 lines.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum RrdError {
    /// The socket could not be reached or broke.
    #[error("rrdcached at {0} not reachable")]
    Unreachable(String, #[source] std::io::Error),
    /// rrdcached answered with an error.
    #[error("rrdcached: {0}")]
    Daemon(String),
    /// An answer we could not parse.
    #[error("rrdcached sent an unexpected answer: {0}")]
    Protocol(String),
}

/// Most commands buffered while rrdcached is down (older ones are dropped first).
pub const MAX_BUFFERED: usize = 200_000;

/// A series fetched from an RRD file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fetched {
    /// Seconds between rows.
    pub step: u64,
    /// Data-source names (columns).
    pub ds: Vec<String>,
    /// Rows: timestamp and one value per data source (None: unknown).
    pub rows: Vec<(u64, Vec<Option<f64>>)>,
}

/// Parses the text answer of FETCH (after its status line).
pub fn parse_fetch(lines: &[String]) -> Result<Fetched, RrdError> {
    let mut step = 0;
    let mut ds = Vec::new();
    let mut rows = Vec::new();
    for l in lines {
        if let Some(v) = l.strip_prefix("Step: ") {
            step = v
                .trim()
                .parse()
                .map_err(|_| RrdError::Protocol(l.clone()))?;
        } else if let Some(v) = l.strip_prefix("DSName: ") {
            ds = v.split_whitespace().map(String::from).collect();
        } else if let Some((ts, vals)) = l.split_once(": ") {
            let Ok(ts) = ts.parse::<u64>() else {
                continue; // FlushVersion, Start, End, DSCount
            };
            let vals = vals
                .split_whitespace()
                .map(|v| v.parse::<f64>().ok().filter(|x| x.is_finite()))
                .collect();
            rows.push((ts, vals));
        }
    }
    Ok(Fetched { step, ds, rows })
}

/// A connection to rrdcached, reconnecting and buffering as needed.
#[derive(Debug)]
pub struct RrdCached {
    socket: PathBuf,
    conn: Option<BufReader<UnixStream>>,
    creates: VecDeque<String>,
    updates: VecDeque<String>,
    /// Commands dropped because the buffer was full.
    pub dropped: u64,
    /// Errors rrdcached reported for individual updates.
    pub update_errors: u64,
    was_down: bool,
}

impl RrdCached {
    /// A client for the daemon listening on `socket`.
    pub fn new(socket: &Path) -> RrdCached {
        RrdCached {
            socket: socket.to_path_buf(),
            conn: None,
            creates: VecDeque::new(),
            updates: VecDeque::new(),
            dropped: 0,
            update_errors: 0,
            was_down: false,
        }
    }

    /// Commands waiting to be sent.
    pub fn buffered(&self) -> usize {
        self.creates.len() + self.updates.len()
    }

    fn connect(&mut self) -> Result<&mut BufReader<UnixStream>, RrdError> {
        if self.conn.is_none() {
            let s = UnixStream::connect(&self.socket)
                .map_err(|e| RrdError::Unreachable(self.socket.display().to_string(), e))?;
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
            self.conn = Some(BufReader::new(s));
        }
        // Just set above when it was None.
        self.conn
            .as_mut()
            .ok_or_else(|| RrdError::Protocol("no connection".into()))
    }

    fn io_err(&mut self, e: std::io::Error) -> RrdError {
        self.conn = None;
        RrdError::Unreachable(self.socket.display().to_string(), e)
    }

    /// Sends one command and reads its status line and the lines it announces.
    fn command(&mut self, cmd: &str) -> Result<(i64, String, Vec<String>), RrdError> {
        let r = (|| {
            let c = self.connect()?;
            c.get_mut()
                .write_all(format!("{cmd}\n").as_bytes())
                .map_err(|e| RrdError::Unreachable(String::new(), e))?;
            read_answer(c)
        })();
        if let Err(RrdError::Unreachable(_, e)) = r {
            return Err(self.io_err(e));
        }
        r
    }

    /// Queues creation of an RRD file starting at `begin` (kept if it exists).
    pub fn create(&mut self, file: &Path, step: u64, begin: u64, ds: &[String], rras: &[String]) {
        let mut c = format!("CREATE {} -s {step} -b {begin} -O", file.display());
        for d in ds.iter().chain(rras) {
            c.push(' ');
            c.push_str(d);
        }
        self.push(true, c);
    }

    /// Queues an update `ts:v:v...`.
    pub fn update(&mut self, file: &Path, ts: u64, values: &[String]) {
        self.push(
            false,
            format!("UPDATE {} {ts}:{}", file.display(), values.join(":")),
        );
    }

    fn push(&mut self, create: bool, c: String) {
        if self.buffered() >= MAX_BUFFERED {
            self.updates.pop_front();
            self.dropped += 1;
        }
        if create {
            self.creates.push_back(c)
        } else {
            self.updates.push_back(c)
        }
    }

    /// Sends what is buffered: CREATEs one by one, then all UPDATEs in one BATCH. On failure
    /// everything stays buffered and the error says so.
    pub fn flush(&mut self) -> Result<(), RrdError> {
        let r = self.try_flush();
        match &r {
            Err(RrdError::Unreachable(..)) => {
                if !self.was_down {
                    log::error!(
                        "rrdcached at {} not reachable: buffering updates ({} waiting)",
                        self.socket.display(),
                        self.buffered()
                    );
                }
                self.was_down = true;
            }
            Ok(()) if self.was_down => {
                log::info!("rrdcached at {} reachable again", self.socket.display());
                self.was_down = false;
            }
            _ => {}
        }
        r
    }

    fn try_flush(&mut self) -> Result<(), RrdError> {
        while let Some(c) = self.creates.front().cloned() {
            let (status, msg, _) = self.command(&c)?;
            if status < 0 && !msg.contains("File exists") {
                log::error!("rrdcached refused `{c}`: {msg}");
            }
            self.creates.pop_front();
        }
        if self.updates.is_empty() {
            return Ok(());
        }
        let (status, msg, _) = self.command("BATCH")?;
        if status != 0 {
            return Err(RrdError::Daemon(msg));
        }
        let mut text = String::new();
        for u in &self.updates {
            text.push_str(u);
            text.push('\n');
        }
        text.push_str(".\n");
        let r = (|| {
            let c = self.connect()?;
            c.get_mut()
                .write_all(text.as_bytes())
                .map_err(|e| RrdError::Unreachable(String::new(), e))?;
            read_answer(c)
        })();
        let (errors, _, lines) = match r {
            Err(RrdError::Unreachable(_, e)) => return Err(self.io_err(e)),
            other => other?,
        };
        if errors > 0 {
            self.update_errors += errors.unsigned_abs();
            for l in lines.iter().take(3) {
                log::warn!("rrdcached update error: {l}");
            }
        }
        self.updates.clear();
        Ok(())
    }

    /// Fetches `file` between two times (consolidation function `cf`, e.g. AVERAGE).
    pub fn fetch(
        &mut self,
        file: &Path,
        cf: &str,
        start: u64,
        end: u64,
    ) -> Result<Fetched, RrdError> {
        let _ = self.flush();
        let (status, msg, lines) =
            self.command(&format!("FETCH {} {cf} {start} {end}", file.display()))?;
        if status < 0 {
            return Err(RrdError::Daemon(msg));
        }
        parse_fetch(&lines)
    }
}

fn read_answer(c: &mut BufReader<UnixStream>) -> Result<(i64, String, Vec<String>), RrdError> {
    let mut line = String::new();
    let io = |e| RrdError::Unreachable(String::new(), e);
    if c.read_line(&mut line).map_err(io)? == 0 {
        return Err(RrdError::Unreachable(
            String::new(),
            std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
        ));
    }
    let line = line.trim_end().to_string();
    let (n, msg) = line.split_once(' ').unwrap_or((&line, ""));
    let n: i64 = n.parse().map_err(|_| RrdError::Protocol(line.clone()))?;
    let mut lines = Vec::new();
    for _ in 0..n.max(0) {
        let mut l = String::new();
        if c.read_line(&mut l).map_err(io)? == 0 {
            break;
        }
        lines.push(l.trim_end().to_string());
    }
    Ok((n, msg.to_string(), lines))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fetch_answer() {
        let lines: Vec<String> = [
            "FlushVersion: 1",
            "Start: 100",
            "End: 102",
            "Step: 1",
            "DSCount: 2",
            "DSName: x y",
            "101: 1.5e+00 -nan",
            "102: 3.0e+00 1.0e+02",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let f = parse_fetch(&lines).unwrap();
        assert_eq!(f.step, 1);
        assert_eq!(f.ds, vec!["x", "y"]);
        assert_eq!(
            f.rows,
            vec![
                (101, vec![Some(1.5), None]),
                (102, vec![Some(3.0), Some(100.0)])
            ]
        );
    }

    #[test]
    fn buffers_while_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = RrdCached::new(&dir.path().join("none.sock"));
        r.create(
            Path::new("/x.rrd"),
            10,
            0,
            &["DS:a:GAUGE:30:U:U".into()],
            &[],
        );
        r.update(Path::new("/x.rrd"), 5, &["1".into()]);
        let e = r.flush().unwrap_err();
        assert!(e.to_string().contains("not reachable"), "{e}");
        assert_eq!(r.buffered(), 2);
    }
}
