//! Target configuration: one export from flags, or several from a TOML file.
//!
//! ```toml
//! interface = "eth0"
//! status_file = "/run/aoe-target.json"   # optional
//!
//! [[export]]
//! shelf = 7
//! slot = 1
//! file = "/srv/aoe/disk0.img"
//! thin = "100G"        # optional: thin export of this size (sparse file + map)
//! thick = false        # optional: allocate the whole size up front
//! writeback = false    # optional: ack from the page cache (not durable)
//! bufcnt = 64          # optional
//! config = "owner=a"   # optional initial config string
//! masks = ["02:00:00:00:00:01"]  # optional MAC mask list
//! read_only = false
//! buffered = false     # optional: no O_DIRECT
//! ```

use std::path::{Path, PathBuf};

use crate::wire::Mac;

/// Errors of configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading the file failed.
    #[error("cannot read config file {path}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is invalid.
    #[error("config file {path}: {message}")]
    Parse {
        /// File.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A value is invalid.
    #[error("{0}")]
    Invalid(String),
}

/// Default advertised buffer count.
pub const DEFAULT_BUFCNT: u16 = 64;
/// Default thin-map block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;

fn default_bufcnt() -> u16 {
    DEFAULT_BUFCNT
}

fn default_block_size() -> String {
    DEFAULT_BLOCK_SIZE.to_string()
}

/// One export.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportOptions {
    /// Shelf (0..=65534).
    pub shelf: u16,
    /// Slot (0..=254).
    pub slot: u8,
    /// Backing file or block device.
    pub file: PathBuf,
    /// Thin export of this size (`100G`, `512M`, bytes...).
    #[serde(default)]
    pub thin: Option<String>,
    /// Allocate the whole advertised size up front.
    #[serde(default)]
    pub thick: bool,
    /// Acknowledge writes from the page cache.
    #[serde(default)]
    pub writeback: bool,
    /// Advertised buffer count.
    #[serde(default = "default_bufcnt")]
    pub bufcnt: u16,
    /// Initial config string (a thin map's persisted string wins).
    #[serde(default)]
    pub config: String,
    /// MAC mask list.
    #[serde(default)]
    pub masks: Vec<String>,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Do not use O_DIRECT.
    #[serde(default)]
    pub buffered: bool,
    /// Thin map path (default `<file>.aoemap`).
    #[serde(default)]
    pub map: Option<PathBuf>,
    /// Thin map block size.
    #[serde(default = "default_block_size")]
    pub block_size: String,
}

/// The whole target.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetOptions {
    /// Network interface.
    pub interface: String,
    /// Where to write the status JSON (every second and at exit).
    #[serde(default)]
    pub status_file: Option<PathBuf>,
    /// Exports.
    #[serde(rename = "export")]
    pub exports: Vec<ExportOptions>,
}

impl TargetOptions {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<TargetOptions, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let opts: TargetOptions = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.message().to_string(),
        })?;
        opts.validate()?;
        Ok(opts)
    }

    /// Checks addresses, sizes, masks and duplicates.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.exports.is_empty() {
            return Err(ConfigError::Invalid("no export configured".into()));
        }
        let mut seen = Vec::new();
        for e in &self.exports {
            if e.shelf == 0xFFFF || e.slot == 0xFF {
                return Err(ConfigError::Invalid(format!(
                    "e{}.{}: shelf 65535 and slot 255 are broadcast addresses",
                    e.shelf, e.slot
                )));
            }
            if seen.contains(&(e.shelf, e.slot)) {
                return Err(ConfigError::Invalid(format!(
                    "e{}.{} is configured twice",
                    e.shelf, e.slot
                )));
            }
            seen.push((e.shelf, e.slot));
            if e.bufcnt == 0 {
                return Err(ConfigError::Invalid("bufcnt must be at least 1".into()));
            }
            if e.config.len() > crate::wire::MAX_CONFIG_STRING {
                return Err(ConfigError::Invalid(
                    "config string longer than 1024 bytes".into(),
                ));
            }
            e.mask_macs()?;
            if let Some(t) = &e.thin {
                parse_size(t)?;
            }
            e.block_size()?;
        }
        Ok(())
    }
}

impl ExportOptions {
    /// The MAC mask list, parsed.
    pub fn mask_macs(&self) -> Result<Vec<Mac>, ConfigError> {
        self.masks
            .iter()
            .map(|m| m.parse::<Mac>().map_err(ConfigError::Invalid))
            .collect()
    }

    /// The thin size in bytes, if thin.
    pub fn thin_bytes(&self) -> Result<Option<u64>, ConfigError> {
        self.thin.as_deref().map(parse_size).transpose()
    }

    /// The thin map block size.
    pub fn block_size(&self) -> Result<u32, ConfigError> {
        let b = parse_size(&self.block_size)?;
        u32::try_from(b)
            .ok()
            .filter(|b| *b >= 4096 && b.is_power_of_two())
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "block size {} is not a power of two between 4K and 2G",
                    self.block_size
                ))
            })
    }

    /// The thin map path.
    pub fn map_path(&self) -> PathBuf {
        self.map.clone().unwrap_or_else(|| {
            let mut p = self.file.clone().into_os_string();
            p.push(".aoemap");
            PathBuf::from(p)
        })
    }
}

/// Parses `4096`, `64K`, `512M`, `10G`, `1T` (binary multiples, optional `B`/`iB`), and
/// requires a multiple of 512.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| ConfigError::Invalid(format!("bad size {s:?}")))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| ConfigError::Invalid(format!("size {s:?} too large")))?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(ConfigError::Invalid(format!(
            "size {s:?} is not a positive multiple of 512 bytes"
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        assert!(parse_size("100").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn toml_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(
            &p,
            r#"
interface = "eth0"
[[export]]
shelf = 7
slot = 1
file = "/srv/a.img"
thin = "1G"
masks = ["02:00:00:00:00:01"]
[[export]]
shelf = 7
slot = 2
file = "/dev/sdb"
writeback = true
"#,
        )
        .unwrap();
        let o = TargetOptions::from_file(&p).unwrap();
        assert_eq!(o.exports.len(), 2);
        assert_eq!(o.exports[0].thin_bytes().unwrap(), Some(1 << 30));
        assert_eq!(o.exports[0].bufcnt, DEFAULT_BUFCNT);
        assert_eq!(o.exports[0].map_path(), PathBuf::from("/srv/a.img.aoemap"));
        assert_eq!(o.exports[0].block_size().unwrap(), DEFAULT_BLOCK_SIZE);
        assert!(o.exports[1].writeback);
        std::fs::write(&p, "interface = \"eth0\"\nexport = []\n").unwrap();
        assert!(TargetOptions::from_file(&p).is_err());
        std::fs::write(&p, "interface = 3").unwrap();
        assert!(matches!(
            TargetOptions::from_file(&p),
            Err(ConfigError::Parse { .. })
        ));
        let dup = "interface=\"e\"\n[[export]]\nshelf=1\nslot=1\nfile=\"a\"\n[[export]]\nshelf=1\nslot=1\nfile=\"b\"\n";
        std::fs::write(&p, dup).unwrap();
        assert!(TargetOptions::from_file(&p).is_err());
        let bcast = "interface=\"e\"\n[[export]]\nshelf=65535\nslot=1\nfile=\"a\"\n";
        std::fs::write(&p, bcast).unwrap();
        assert!(TargetOptions::from_file(&p).is_err());
    }
}
