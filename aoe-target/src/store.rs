//! Opening an export's backing store: a raw file or block device, or a thin (sparse file plus
//! map) or thick (preallocated) export.
//!
//! Data is direct-mapped: byte `b` of the disk is byte `b` of the backing file, so the file is
//! a plain disk image any other tool (vblade, losetup) can read. Thin exports need a regular
//! file (holes read as zeros); a block device is always exported as it is.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::config::{ConfigError, ExportOptions};
use crate::thin::{ThinError, ThinMap};
use crate::wire::SECTOR;

/// Errors opening a backing store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing file cannot be opened or sized.
    #[error("backing file {path}")]
    Open {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The thin map is unusable.
    #[error(transparent)]
    Map(#[from] ThinError),
    /// Bad options.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The request does not fit the existing files.
    #[error("{0}")]
    Mismatch(String),
}

/// An opened backing store.
#[derive(Debug)]
pub struct Backing {
    /// Data (O_DIRECT when `direct`).
    pub data: File,
    /// Thin map file.
    pub map_file: Option<File>,
    /// Thin map content (moved into the engine when serving).
    pub map: Option<ThinMap>,
    /// Advertised sectors.
    pub sectors: u64,
    /// O_DIRECT in use.
    pub direct: bool,
}

fn open_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Open {
        path: path.display().to_string(),
        source,
    }
}

fn open_data(path: &Path, read_only: bool, create: bool, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(!read_only).create(create && !read_only);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

impl Backing {
    /// Opens (and for a new thin or thick export, creates) the backing store of `o`.
    pub fn open(o: &ExportOptions) -> Result<Backing, StoreError> {
        let path = o.file.as_path();
        let thin = o.thin_bytes()?;
        let is_block = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let map = match thin {
            Some(size) => {
                if is_block {
                    return Err(StoreError::Mismatch(format!(
                        "{}: a thin export needs a regular file, not a block device",
                        path.display()
                    )));
                }
                Some(Backing::open_map(o, size)?)
            }
            None => None,
        };
        // Write-back means page-cache semantics: no O_DIRECT.
        let want_direct = !o.buffered && !o.writeback;
        let mut data = open_data(path, o.read_only, map.is_some(), want_direct)
            .or_else(|e| {
                // Some file systems refuse O_DIRECT at open time (EINVAL).
                if want_direct && e.raw_os_error() == Some(libc::EINVAL) {
                    open_data(path, o.read_only, map.is_some(), false)
                } else {
                    Err(e)
                }
            })
            .map_err(open_err(path))?;
        let mut direct = want_direct;
        if want_direct {
            match crate::sys::direct_io_alignment(&data) {
                Some(a) if a == 0 || a as usize > SECTOR => {
                    log::warn!(
                        "{}: O_DIRECT needs {a}-byte alignment here; using buffered I/O with O_DSYNC writes",
                        path.display()
                    );
                    data = open_data(path, o.read_only, false, false).map_err(open_err(path))?;
                    direct = false;
                }
                _ => {}
            }
        }
        let sectors = match &map {
            Some((_, m)) => {
                let len = m.sectors() * SECTOR as u64;
                if data.metadata().map_err(open_err(path))?.len() < len {
                    data.set_len(len).map_err(open_err(path))?;
                }
                m.sectors()
            }
            None => data.seek(SeekFrom::End(0)).map_err(open_err(path))? / SECTOR as u64,
        };
        if sectors == 0 {
            return Err(StoreError::Mismatch(format!(
                "{}: smaller than one sector",
                path.display()
            )));
        }
        if o.thick {
            crate::sys::fallocate(&data, sectors * SECTOR as u64).map_err(open_err(path))?;
        }
        let (map_file, map) = match map {
            Some((f, m)) => (Some(f), Some(m)),
            None => (None, None),
        };
        Ok(Backing {
            data,
            map_file,
            map,
            sectors,
            direct,
        })
    }

    fn open_map(o: &ExportOptions, size: u64) -> Result<(File, ThinMap), StoreError> {
        let map_path = o.map_path();
        let path = o.file.as_path();
        let map = if map_path.exists() {
            let m = ThinMap::load_file(&map_path)?;
            if m.sectors() * SECTOR as u64 != size {
                return Err(StoreError::Mismatch(format!(
                    "{} describes {} bytes but the export asks for {size}",
                    map_path.display(),
                    m.sectors() * SECTOR as u64
                )));
            }
            m
        } else {
            let existing = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            if existing > 0 {
                return Err(StoreError::Mismatch(format!(
                    "{} holds data but has no thin map {}: export it without --thin, or remove it",
                    path.display(),
                    map_path.display()
                )));
            }
            let mut m = ThinMap::new(size / SECTOR as u64, o.block_size()?)?;
            m.set_config(o.config.as_bytes());
            m.create_file(&map_path)?;
            m
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&map_path)
            .map_err(open_err(&map_path))?;
        Ok((file, map))
    }

    /// Bytes the data file occupies on disk.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.data.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(file: &Path) -> ExportOptions {
        ExportOptions {
            shelf: 1,
            slot: 1,
            file: file.to_path_buf(),
            thin: None,
            thick: false,
            writeback: false,
            bufcnt: 16,
            config: String::new(),
            masks: Vec::new(),
            read_only: false,
            buffered: false,
            map: None,
            block_size: "64K".into(),
        }
    }

    #[test]
    fn thin_creates_sparse_file_and_map_then_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.img");
        let o = ExportOptions {
            thin: Some("1G".into()),
            config: "c".into(),
            ..opts(&f)
        };
        let b = Backing::open(&o).unwrap();
        assert_eq!(b.sectors, 2 << 20);
        assert!(b.allocated_bytes() < 1 << 20, "sparse");
        assert_eq!(b.map.as_ref().unwrap().config(), b"c");
        assert!(b.map_file.is_some());
        drop(b);
        let b = Backing::open(&o).unwrap();
        assert_eq!(b.sectors, 2 << 20);
        let bad = ExportOptions {
            thin: Some("2G".into()),
            ..opts(&f)
        };
        assert!(matches!(Backing::open(&bad), Err(StoreError::Mismatch(_))));
    }

    #[test]
    fn thin_refuses_existing_data_without_map() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.img");
        std::fs::write(&f, vec![1u8; 4096]).unwrap();
        let o = ExportOptions {
            thin: Some("1M".into()),
            ..opts(&f)
        };
        assert!(matches!(Backing::open(&o), Err(StoreError::Mismatch(_))));
    }

    #[test]
    fn raw_and_thick() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.img");
        assert!(matches!(
            Backing::open(&opts(&f)),
            Err(StoreError::Open { .. })
        ));
        std::fs::File::create(&f).unwrap().set_len(1 << 20).unwrap();
        let b = Backing::open(&ExportOptions {
            thick: true,
            ..opts(&f)
        })
        .unwrap();
        assert_eq!(b.sectors, 2048);
        assert!(b.map.is_none());
        assert!(b.allocated_bytes() >= 1 << 20);
        std::fs::write(&f, [0u8; 100]).unwrap();
        assert!(matches!(
            Backing::open(&opts(&f)),
            Err(StoreError::Mismatch(_))
        ));
    }
}
