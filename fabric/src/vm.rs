//! VMs of a host: `fabricd` starts and stops `vmm` processes for the control verbs (seed §2.4
//! "Orchestration API"). The VMM is never linked in: it is a separate binary, found by path.
//!
//! The command line given to the vmm: `--numa-nodes N --vcpus N --memory SIZE [--pin] --json
//! [--kernel K [--initrd I] [--cmdline C]] [--passes N] [--disk D]...`; without `--kernel` it
//! runs its built-in guest (`--passes`: how many STREAM passes it runs, so how long). Its stdout and stderr go to `<log dir>/<name>.log`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors of this module.
#[derive(Debug, Error)]
pub enum VmError {
    /// A VM of that name exists.
    #[error("VM {0} exists")]
    Exists(String),
    /// No VM of that name.
    #[error("no VM named {0}")]
    NotFound(String),
    /// The spec is not acceptable.
    #[error("bad VM spec: {0}")]
    Spec(String),
    /// The vmm could not be started.
    #[error("cannot start {bin}")]
    Spawn {
        /// The vmm binary.
        bin: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The log file could not be created.
    #[error("cannot create {0}")]
    Log(String, #[source] std::io::Error),
    /// The VM's threads could not be pinned.
    #[error("cannot pin VM {0}")]
    Pin(String, #[source] std::io::Error),
}

/// What to create (the `vm create` verb).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Unique name on the host.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory size as the vmm takes it (`512M`, `2G`).
    pub memory: String,
    /// Virtual NUMA nodes.
    #[serde(default = "one")]
    pub numa_nodes: u32,
    /// Pin vCPUs to host cores.
    #[serde(default)]
    pub pin: bool,
    /// Guest kernel; the built-in guest when absent.
    #[serde(default)]
    pub kernel: Option<String>,
    /// Initrd.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// STREAM passes of the built-in guest (the vmm's default when absent).
    #[serde(default)]
    pub passes: Option<u32>,
    /// Disks.
    #[serde(default)]
    pub disks: Vec<String>,
    /// Host-side network devices of the guest's interfaces (monitored as VIFs, §2.6.1 item 8).
    #[serde(default)]
    pub vifs: Vec<String>,
}

fn one() -> u32 {
    1
}

impl VmSpec {
    /// Checks the spec.
    pub fn validate(&self) -> Result<(), VmError> {
        let bad = |m: &str| Err(VmError::Spec(m.to_string()));
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad("name must be 1-64 of [A-Za-z0-9_-]");
        }
        if self.vcpus == 0 || self.vcpus > 1024 {
            return bad("vcpus must be 1..=1024");
        }
        if self.numa_nodes == 0 || self.numa_nodes > self.vcpus {
            return bad("numa_nodes must be 1..=vcpus");
        }
        let m = self.memory.trim_end_matches(['K', 'M', 'G', 'k', 'm', 'g']);
        if m.is_empty() || m.parse::<u64>().is_err() {
            return bad("memory must be a size like 512M or 2G");
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return bad("an initrd needs a kernel");
        }
        if self.passes.is_some() && self.kernel.is_some() {
            return bad("passes are for the built-in guest, not a kernel");
        }
        Ok(())
    }

    /// The vmm's arguments.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--numa-nodes".to_string(),
            self.numa_nodes.to_string(),
            "--vcpus".into(),
            self.vcpus.to_string(),
            "--memory".into(),
            self.memory.clone(),
        ];
        if self.pin {
            a.push("--pin".into());
        }
        a.push("--json".into());
        for (flag, v) in [
            ("--kernel", &self.kernel),
            ("--initrd", &self.initrd),
            ("--cmdline", &self.cmdline),
        ] {
            if let Some(v) = v {
                a.push(flag.into());
                a.push(v.clone());
            }
        }
        if let Some(p) = self.passes {
            a.push("--passes".into());
            a.push(p.to_string());
        }
        for d in &self.disks {
            a.push("--disk".into());
            a.push(d.clone());
        }
        a
    }
}

/// A random (version 4) UUID.
fn new_uuid() -> String {
    let mut b = [0u8; 16];
    for chunk in b.chunks_mut(4) {
        chunk.copy_from_slice(&crate::auth::random_id().unwrap_or(0).to_be_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A VM's state as reported by `vm list`/`vm status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Name.
    pub name: String,
    /// UUID given at creation.
    pub uuid: String,
    /// Process id of its vmm.
    pub pid: u32,
    /// `running` or `exited`.
    pub state: String,
    /// Exit code once exited (None if killed by a signal or running).
    pub exit_code: Option<i32>,
    /// Seconds since it was started.
    pub uptime_secs: u64,
    /// Its spec.
    pub spec: VmSpec,
    /// Its vmm log file.
    pub log: String,
}

#[derive(Debug)]
struct Vm {
    spec: VmSpec,
    uuid: String,
    child: Child,
    started: Instant,
    exit: Option<std::process::ExitStatus>,
    log: PathBuf,
}

/// The VMs of this host.
#[derive(Debug)]
pub struct VmManager {
    vmm_bin: PathBuf,
    log_dir: PathBuf,
    vms: BTreeMap<String, Vm>,
}

impl VmManager {
    /// A manager starting `vmm_bin`, logging to `log_dir`.
    pub fn new(vmm_bin: &Path, log_dir: &Path) -> VmManager {
        VmManager {
            vmm_bin: vmm_bin.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
            vms: BTreeMap::new(),
        }
    }

    /// Starts a VM.
    pub fn create(&mut self, spec: VmSpec) -> Result<VmStatus, VmError> {
        spec.validate()?;
        if self.vms.contains_key(&spec.name) {
            return Err(VmError::Exists(spec.name));
        }
        std::fs::create_dir_all(&self.log_dir)
            .map_err(|e| VmError::Log(self.log_dir.display().to_string(), e))?;
        let log = self.log_dir.join(format!("{}.log", spec.name));
        let f =
            std::fs::File::create(&log).map_err(|e| VmError::Log(log.display().to_string(), e))?;
        let f2 = f
            .try_clone()
            .map_err(|e| VmError::Log(log.display().to_string(), e))?;
        let child = Command::new(&self.vmm_bin)
            .args(spec.args())
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(|source| VmError::Spawn {
                bin: self.vmm_bin.display().to_string(),
                source,
            })?;
        log::info!(
            "VM {} started: {} (pid {})",
            spec.name,
            self.vmm_bin.display(),
            child.id()
        );
        let name = spec.name.clone();
        self.vms.insert(
            name.clone(),
            Vm {
                spec,
                uuid: new_uuid(),
                child,
                started: Instant::now(),
                exit: None,
                log,
            },
        );
        self.status(&name)
    }

    /// Stops a VM (SIGKILL, like pulling the plug) and forgets it.
    pub fn destroy(&mut self, name: &str) -> Result<VmStatus, VmError> {
        self.status(name)?;
        let mut vm = self
            .vms
            .remove(name)
            .ok_or_else(|| VmError::NotFound(name.to_string()))?;
        if vm.exit.is_none() {
            // Killing an exited-but-unreaped child fails harmlessly; wait reaps it either way.
            let _ = vm.child.kill();
            vm.exit = vm.child.wait().ok();
        }
        log::info!("VM {name} destroyed");
        Ok(Self::to_status(&vm))
    }

    fn to_status(vm: &Vm) -> VmStatus {
        VmStatus {
            name: vm.spec.name.clone(),
            uuid: vm.uuid.clone(),
            pid: vm.child.id(),
            state: if vm.exit.is_some() {
                "exited"
            } else {
                "running"
            }
            .into(),
            exit_code: vm.exit.and_then(|e| e.code()),
            uptime_secs: vm.started.elapsed().as_secs(),
            spec: vm.spec.clone(),
            log: vm.log.display().to_string(),
        }
    }

    /// One VM's status.
    pub fn status(&mut self, name: &str) -> Result<VmStatus, VmError> {
        let vm = self
            .vms
            .get_mut(name)
            .ok_or_else(|| VmError::NotFound(name.to_string()))?;
        if vm.exit.is_none() {
            vm.exit = vm.child.try_wait().ok().flatten();
        }
        Ok(Self::to_status(vm))
    }

    /// All VMs.
    pub fn list(&mut self) -> Vec<VmStatus> {
        let names: Vec<String> = self.vms.keys().cloned().collect();
        names.iter().filter_map(|n| self.status(n).ok()).collect()
    }

    /// Pins a VM: its vCPU threads (named `vcpu*`, in name order) round-robin on `cpus`, its
    /// other threads on all of `cpus`. Returns thread name → CPUs.
    pub fn pin(&mut self, name: &str, cpus: &[u32]) -> Result<BTreeMap<String, Vec<u32>>, VmError> {
        if cpus.is_empty() {
            return Err(VmError::Spec("no CPUs to pin to".into()));
        }
        let pid = self.running_pid(name)?;
        let threads = crate::affinity::threads(pid).map_err(|e| VmError::Pin(name.into(), e))?;
        let mut done = BTreeMap::new();
        let mut vcpu = 0;
        for (tid, comm) in threads {
            let set = if comm.starts_with("vcpu") {
                vcpu += 1;
                vec![cpus[(vcpu - 1) % cpus.len()]]
            } else {
                cpus.to_vec()
            };
            crate::affinity::set_affinity(tid, &set).map_err(|e| VmError::Pin(name.into(), e))?;
            done.insert(format!("{comm}/{tid}"), set);
        }
        log::info!("VM {name} pinned to CPUs {cpus:?}");
        Ok(done)
    }

    /// Unpins a VM: every thread may run on every online CPU.
    pub fn unpin(&mut self, name: &str) -> Result<BTreeMap<String, Vec<u32>>, VmError> {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .and_then(|s| crate::hostinfo::parse_cpulist(&s))
            .ok_or_else(|| VmError::Spec("cannot read the online CPUs".into()))?;
        let pid = self.running_pid(name)?;
        let threads = crate::affinity::threads(pid).map_err(|e| VmError::Pin(name.into(), e))?;
        let mut done = BTreeMap::new();
        for (tid, comm) in threads {
            crate::affinity::set_affinity(tid, &online)
                .map_err(|e| VmError::Pin(name.into(), e))?;
            done.insert(format!("{comm}/{tid}"), online.clone());
        }
        Ok(done)
    }

    fn running_pid(&mut self, name: &str) -> Result<u32, VmError> {
        let st = self.status(name)?;
        if st.state != "running" {
            return Err(VmError::Spec(format!("VM {name} is not running")));
        }
        Ok(st.pid)
    }

    /// Number of VMs (running or exited, not yet destroyed).
    pub fn len(&self) -> usize {
        self.vms.len()
    }

    /// Whether there are no VMs.
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }
}

impl Drop for VmManager {
    fn drop(&mut self) {
        for vm in self.vms.values_mut() {
            if vm.exit.is_none() {
                let _ = vm.child.kill();
                let _ = vm.child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            vcpus: 2,
            memory: "256M".into(),
            numa_nodes: 2,
            pin: true,
            kernel: None,
            initrd: None,
            cmdline: None,
            passes: None,
            disks: vec![],
            vifs: vec![],
        }
    }

    #[test]
    fn spec_checks_and_args() {
        let s = spec("vm-1");
        s.validate().unwrap();
        assert_eq!(
            s.args().join(" "),
            "--numa-nodes 2 --vcpus 2 --memory 256M --pin --json"
        );
        for bad in [
            VmSpec {
                name: "a b".into(),
                ..spec("x")
            },
            VmSpec {
                vcpus: 0,
                ..spec("x")
            },
            VmSpec {
                numa_nodes: 3,
                ..spec("x")
            },
            VmSpec {
                memory: "lots".into(),
                ..spec("x")
            },
            VmSpec {
                initrd: Some("i".into()),
                ..spec("x")
            },
            VmSpec {
                kernel: Some("/k".into()),
                passes: Some(3),
                ..spec("x")
            },
        ] {
            assert!(matches!(bad.validate(), Err(VmError::Spec(_))), "{bad:?}");
        }
        let k = VmSpec {
            kernel: Some("/k".into()),
            disks: vec!["/d".into()],
            ..spec("x")
        };
        assert!(k.args().join(" ").ends_with("--json --kernel /k --disk /d"));
        let p = VmSpec {
            passes: Some(300),
            ..spec("x")
        };
        p.validate().unwrap();
        assert!(p.args().join(" ").ends_with("--pin --json --passes 300"));
    }

    /// `sleep` stands in for the vmm here: this unit test checks process handling only
    /// (the real vmm is exercised by the end-to-end test when it is built).
    #[test]
    fn create_status_destroy_with_a_stand_in_process() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("vmm-stand-in");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"STAND-IN vmm $*\"\nexec sleep 30\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        println!("note: this test uses a STAND-IN for the vmm (a shell script), not the real vmm");
        let mut m = VmManager::new(&script, dir.path());
        let st = m.create(spec("a")).unwrap();
        assert_eq!(st.state, "running");
        assert_eq!(st.uuid.len(), 36);
        assert!(matches!(m.create(spec("a")), Err(VmError::Exists(_))));
        assert_eq!(m.list().len(), 1);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let log = std::fs::read_to_string(&st.log).unwrap();
        assert!(
            log.contains("STAND-IN vmm --numa-nodes 2 --vcpus 2"),
            "{log}"
        );
        let d = m.destroy("a").unwrap();
        assert_eq!(d.state, "exited");
        assert!(matches!(m.status("a"), Err(VmError::NotFound(_))));
        assert!(m.is_empty());
        let mut bad = VmManager::new(Path::new("/nonexistent/vmm"), dir.path());
        assert!(matches!(bad.create(spec("b")), Err(VmError::Spawn { .. })));
    }
}
