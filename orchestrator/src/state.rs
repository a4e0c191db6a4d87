//! Where a VM's runtime state lives: `$XDG_RUNTIME_DIR/vmm/<name>` (or
//! `/run/vmm/<name>` as root, else `/tmp/vmm-<uid>/<name>`), holding the
//! device sockets, per-device logs, the status file and a lock, so two
//! orchestrators cannot drive one VM.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors about the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use the state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "VM `{name}` is already run by another orchestrator (pid {pid}); \
         stop it with `orchestrator down --name {name}` or pick another [vm] name"
    )]
    Busy { name: String, pid: String },
    #[error(
        "the state directory {path} {why}: another user could plant sockets in it; \
         remove it, or set XDG_RUNTIME_DIR to a directory of your own"
    )]
    NotOurs { path: PathBuf, why: String },
}

/// The state directory of one VM, locked for as long as this value lives.
pub struct StateDir {
    pub root: PathBuf,
    pub name: String,
    _lock: File,
}

/// The directory holding every VM's state directory.
pub fn base_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(x).join("vmm");
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/vmm")
    } else {
        std::env::temp_dir().join(format!("vmm-{uid}"))
    }
}

/// The state directory of VM `name` (not locked: for readers).
pub fn dir_of(name: &str) -> PathBuf {
    base_dir().join(name)
}

/// Refuse a state directory that is not a directory owned by this user, or
/// that others may write to (a symbolic link planted there included).
fn check_private(dir: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).map_err(|source| StateError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let why = if !meta.is_dir() {
        Some("is not a directory".to_string())
    } else if meta.uid() != uid {
        Some(format!("belongs to uid {}, not to you ({uid})", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "is writable by others (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(StateError::NotOurs {
            path: dir.to_path_buf(),
            why,
        }),
        None => Ok(()),
    }
}

impl StateDir {
    /// Create and lock the state directory of VM `name`.
    pub fn acquire(name: &str) -> Result<Self, StateError> {
        Self::acquire_in(&base_dir(), name)
    }

    /// [`StateDir::acquire`] under `base` instead of [`base_dir`].
    pub fn acquire_in(base: &Path, name: &str) -> Result<Self, StateError> {
        let root = base.join(name);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        // Made private to us; and one that exists already (in /tmp, where
        // anyone may make it first) is used only if it is ours alone.
        for dir in [base, root.as_path()] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
            check_private(dir)?;
        }
        for sub in ["sockets", "logs", "notify"] {
            std::fs::create_dir_all(root.join(sub)).map_err(io(&root))?;
        }
        let lock_path = root.join("lock");
        let mut lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // SAFETY: flock on our own descriptor.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = std::fs::read_to_string(&lock_path).unwrap_or_default();
            return Err(StateError::Busy {
                name: name.into(),
                pid: pid.trim().to_string(),
            });
        }
        lock.set_len(0).map_err(io(&lock_path))?;
        write!(lock, "{}", std::process::id()).map_err(io(&lock_path))?;
        Ok(StateDir {
            root,
            name: name.into(),
            _lock: lock,
        })
    }

    pub fn socket(&self, device: &str) -> PathBuf {
        self.root.join("sockets").join(format!("{device}.sock"))
    }
    pub fn log(&self, device: &str) -> PathBuf {
        self.root.join("logs").join(format!("{device}.log"))
    }
    pub fn notify(&self, device: &str) -> PathBuf {
        self.root.join("notify").join(device)
    }
    pub fn status_file(&self) -> PathBuf {
        self.root.join("status.json")
    }
}

/// One row of `orchestrator status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub device: String,
    pub pid: Option<u32>,
    pub state: String,
    pub restarts: u32,
    /// Seconds since the UNIX epoch when the current process started.
    pub started_at: u64,
    pub socket: PathBuf,
    pub command: Vec<String>,
    /// How the last process ended, with its last line of output.
    #[serde(default)]
    pub last_error: Option<String>,
    /// At the last restart, how long the device had no backend (death to
    /// the successor's readiness), in ms.
    #[serde(default)]
    pub last_down_ms: Option<u64>,
}

/// What `status.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub orchestrator_pid: u32,
    pub vmm: String,
    pub vmm_pid: Option<u32>,
    pub devices: Vec<DeviceStatus>,
}

impl VmStatus {
    /// Read a VM's status file.
    pub fn read(name: &str) -> Option<VmStatus> {
        let text = std::fs::read_to_string(dir_of(name).join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Read a VM's status file under another runtime directory (tests).
    pub fn read_in(runtime_dir: &Path, name: &str) -> Option<VmStatus> {
        let path = runtime_dir.join("vmm").join(name).join("status.json");
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    /// Write it atomically (a reader never sees half a file).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_orchestrator_per_vm() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: the only test in this crate touching XDG_RUNTIME_DIR.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", dir.path()) };
        let a = StateDir::acquire("t").unwrap();
        assert!(a.root.join("sockets").is_dir());
        let e = StateDir::acquire("t").err().unwrap();
        assert!(
            e.to_string()
                .contains("already run by another orchestrator"),
            "{e}"
        );
        drop(a);
        StateDir::acquire("t").unwrap();

        // A directory others may write to, or someone else's, is refused.
        use std::os::unix::fs::PermissionsExt;
        let vm = dir.path().join("vmm").join("open");
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::set_permissions(&vm, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = StateDir::acquire("open").err().unwrap();
        assert!(e.to_string().contains("writable by others"), "{e}");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = dir.path().join("vmm").join("theirs");
            std::fs::create_dir_all(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
            let e = StateDir::acquire("theirs").err().unwrap();
            assert!(e.to_string().contains("belongs to uid 65534"), "{e}");
        }
        let link = dir.path().join("vmm").join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let e = StateDir::acquire("link").err().unwrap();
        assert!(e.to_string().contains("not a directory"), "{e}");
    }
}
