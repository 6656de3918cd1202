//! The configuration file of `fabricd` and `fabric` (JSON; every key optional, command-line
//! flags take precedence). Example:
//!
//! ```json
//! { "iface": "eth1", "name": "node-a", "key_file": "/etc/fabric/key",
//!   "link_tolerance_ms": 1000, "vmm_bin": "/usr/local/bin/vmm" }
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {0}")]
    Read(String, #[source] std::io::Error),
    /// The file is not valid.
    #[error("config file {0}")]
    Parse(String, #[source] serde_json::Error),
}

/// Settings from a config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Network interface.
    pub iface: Option<String>,
    /// Node name.
    pub name: Option<String>,
    /// Key file.
    pub key_file: Option<PathBuf>,
    /// Link tolerance T, ms.
    pub link_tolerance_ms: Option<u64>,
    /// The vmm binary.
    pub vmm_bin: Option<PathBuf>,
    /// Directory of VM logs.
    pub vm_log_dir: Option<PathBuf>,
    /// Monitoring interval, s (0 disables the agent).
    pub monitor_interval_secs: Option<u64>,
    /// Aggregator MAC for reports (broadcast when absent).
    pub monitor_to: Option<String>,
    /// Run the aggregator.
    pub aggregator: Option<bool>,
    /// RRD directory.
    pub rrd_dir: Option<PathBuf>,
    /// rrdcached socket.
    pub rrdcached: Option<PathBuf>,
    /// RRD step, s.
    pub step_secs: Option<u64>,
    /// Prometheus listen address.
    pub prometheus: Option<String>,
}

impl FileConfig {
    /// Reads a config file; `None` gives the empty config.
    pub fn load(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read(path.display().to_string(), e))?;
        serde_json::from_str(&text).map_err(|e| ConfigError::Parse(path.display().to_string(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        std::fs::write(&p, r#"{"iface":"eth1","link_tolerance_ms":50}"#).unwrap();
        let c = FileConfig::load(Some(&p)).unwrap();
        assert_eq!(c.iface.as_deref(), Some("eth1"));
        assert_eq!(c.link_tolerance_ms, Some(50));
        std::fs::write(&p, r#"{"ifac":"eth1"}"#).unwrap();
        assert!(FileConfig::load(Some(&p)).is_err());
        assert!(FileConfig::load(Some(&dir.path().join("none"))).is_err());
        assert!(FileConfig::load(None).unwrap().iface.is_none());
    }
}
