//! What every vhost-user backend of the workspace shares, so the three device
//! processes do not each carry a copy: the listening socket (bound by path or
//! inherited from a supervisor), the serve loop, sandboxing, and logging
//! set-up.

pub mod notify;
pub mod sandbox;
pub mod seccomp;
mod serve;
pub mod shim;
pub mod vu_msg;

pub use serve::{serve, serve_with_hooks, ConnectionHooks, NoHooks, ServeError};

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Errors setting up a backend's socket or logging.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("give exactly one of --socket-path and --fd")]
    SocketChoice,
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--fd {fd} is not a listening Unix stream socket")]
    NotListener {
        fd: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid log filter `{filter}`")]
    LogFilter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
}

/// Where a backend gets its vhost-user socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSource {
    /// Bind and listen at this path, replacing a stale socket file.
    Path(PathBuf),
    /// A listening socket inherited from a supervisor (`--fd`), so a
    /// restarted backend serves the very socket the VMM reconnects to.
    Fd(RawFd),
}

impl SocketSource {
    /// From the two mutually exclusive flags every backend accepts.
    pub fn from_flags(path: Option<PathBuf>, fd: Option<RawFd>) -> Result<Self, SetupError> {
        match (path, fd) {
            (Some(p), None) => Ok(SocketSource::Path(p)),
            (None, Some(fd)) => Ok(SocketSource::Fd(fd)),
            _ => Err(SetupError::SocketChoice),
        }
    }

    /// Open the listener.
    pub fn listen(&self) -> Result<UnixListener, SetupError> {
        match self {
            SocketSource::Path(p) => bind(p),
            SocketSource::Fd(fd) => inherited(*fd),
        }
    }
}

fn bind(path: &Path) -> Result<UnixListener, SetupError> {
    let err = |source| SetupError::Bind {
        path: path.to_path_buf(),
        source,
    };
    // Only a socket file is replaced: a typo must not delete someone's file.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(err)?;
        }
    }
    UnixListener::bind(path).map_err(err)
}

/// An integer SOL_SOCKET option of `fd`.
fn sockopt_int(fd: RawFd, opt: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, which is a c_int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

fn inherited(fd: RawFd) -> Result<UnixListener, SetupError> {
    let not = |source| SetupError::NotListener { fd, source };
    let ty = sockopt_int(fd, libc::SO_TYPE).map_err(not)?;
    let acc = sockopt_int(fd, libc::SO_ACCEPTCONN).map_err(not)?;
    if ty != libc::SOCK_STREAM || acc == 0 {
        return Err(not(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a listening stream socket",
        )));
    }
    // SAFETY: the caller handed us this descriptor (--fd) to own; it was just
    // checked to be a listening stream socket.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(UnixListener::from(owned))
}

/// Set up `tracing` on stderr: `RUST_LOG` wins, else `level` (a filter such
/// as `info` or `virtiofsd_fast=debug`).
pub fn init_logging(level: &str) -> Result<(), SetupError> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => f,
        _ => level.to_string(),
    };
    let env =
        EnvFilter::try_new(&filter).map_err(|source| SetupError::LogFilter { filter, source })?;
    // Colour only on a terminal: logs kept in files (the orchestrator's)
    // and read by programs stay plain text.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    // A second init (tests) keeps the first subscriber: not an error.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
    Ok(())
}

/// Logging set-up like [`init_logging`], with each line sent to the
/// system log (/dev/log, facility daemon) as `name[pid]: line` instead of
/// stderr: virtiofsd's `--syslog`, which Kata passes. Where no syslog
/// daemon listens, logs stay on stderr and the first line says why.
pub fn init_syslog(name: &str, level: &str) -> Result<(), SetupError> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => f,
        _ => level.to_string(),
    };
    let env =
        EnvFilter::try_new(&filter).map_err(|source| SetupError::LogFilter { filter, source })?;
    let sock =
        std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.connect("/dev/log").map(|()| s));
    match sock {
        Ok(sock) => {
            let w = syslog::Syslog {
                sock: std::sync::Arc::new(sock),
                tag: format!("{name}[{}]: ", std::process::id()),
            };
            let _ = tracing_subscriber::fmt()
                .with_env_filter(env)
                .with_ansi(false)
                .without_time()
                .with_writer(w)
                .try_init();
        }
        Err(e) => {
            init_logging(level)?;
            tracing::warn!(error = %e, "--syslog: no system log at /dev/log; logging to stderr");
        }
    }
    Ok(())
}

mod syslog {
    use std::sync::Arc;

    /// Makes one writer per log event, at the event's severity.
    pub struct Syslog {
        pub sock: Arc<std::os::unix::net::UnixDatagram>,
        pub tag: String,
    }

    /// One event: its line goes out as one datagram.
    pub struct Line {
        sock: Arc<std::os::unix::net::UnixDatagram>,
        head: String,
    }

    impl std::io::Write for Line {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let text = String::from_utf8_lossy(buf);
            let msg = format!("{}{}", self.head, text.trim_end_matches('\n'));
            // A full or absent log socket loses the line, never the daemon.
            let _ = self.sock.send(msg.as_bytes());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Syslog {
        type Writer = Line;
        fn make_writer(&'a self) -> Line {
            self.line(6)
        }
        fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line {
            // Severities: err 3, warning 4, info 6, debug 7.
            let sev = match *meta.level() {
                tracing::Level::ERROR => 3,
                tracing::Level::WARN => 4,
                tracing::Level::INFO => 6,
                _ => 7,
            };
            self.line(sev)
        }
    }

    impl Syslog {
        fn line(&self, severity: u8) -> Line {
            // Facility daemon (3).
            Line {
                sock: self.sock.clone(),
                head: format!("<{}>{}", 3 * 8 + severity, self.tag),
            }
        }
    }
}

/// For tests: a prerequisite is missing. On a developer machine the test
/// says `skipped: <reason>` on stderr (not through `println!`, which the
/// harness hides) and returns; under CI (where `CI` is set) a missing
/// prerequisite is a failure, so no test passes there by skipping.
pub fn skip_or_fail(reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{reason} (CI is set, so a missing prerequisite is a failure, not a skip)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn exactly_one_socket_flag() {
        assert!(matches!(
            SocketSource::from_flags(None, None),
            Err(SetupError::SocketChoice)
        ));
        assert!(matches!(
            SocketSource::from_flags(Some("/x".into()), Some(3)),
            Err(SetupError::SocketChoice)
        ));
        assert_eq!(
            SocketSource::from_flags(None, Some(3)).unwrap(),
            SocketSource::Fd(3)
        );
    }

    #[test]
    fn binding_replaces_a_stale_socket_but_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        drop(SocketSource::Path(sock.clone()).listen().unwrap());
        // The file is left behind by the dropped listener: a restart reuses the path.
        SocketSource::Path(sock.clone()).listen().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"keep").unwrap();
        assert!(SocketSource::Path(file.clone()).listen().is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }

    #[test]
    fn inherited_fd_must_be_a_listener() {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("l")).unwrap();
        let fd = l.into_raw_fd();
        let l = SocketSource::Fd(fd).listen().unwrap();
        let _c = std::os::unix::net::UnixStream::connect(dir.path().join("l")).unwrap();
        l.accept().unwrap();

        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.into_raw_fd();
        assert!(matches!(
            SocketSource::Fd(fd).listen(),
            Err(SetupError::NotListener { .. })
        ));
        // SAFETY: the failed listen did not take ownership; close it here.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }

    #[test]
    fn bad_log_filter_is_an_error() {
        std::env::remove_var("RUST_LOG");
        assert!(init_logging("info").is_ok());
        assert!(matches!(
            init_logging("=[bad"),
            Err(SetupError::LogFilter { .. })
        ));
    }
}

/// Whether this CPU has VT-x or AMD-V (vmx or svm in /proc/cpuinfo). Where
/// it has neither, /dev/kvm may still work (PVM, a software
/// virtualization), but a guest kernel without PVM support runs only as
/// far as KVM's instruction emulator takes it. Read once: a sandboxed
/// process must call it before its sandbox hides /proc.
pub fn hardware_virtualization() -> bool {
    static HW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HW.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    })
}

/// The bytes of a config space a GET_CONFIG asks for: `size` bytes from
/// `offset`, zeros past the end, as a real device reads.
pub fn config_slice(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = (offset as usize).min(config.len());
    let end = start.saturating_add(size as usize).min(config.len());
    let mut out = config[start..end].to_vec();
    out.resize(size as usize, 0);
    out
}

/// A count of one kind of guest fault, so logs stay readable when a hostile
/// or broken guest sends a flood of bad requests.
#[derive(Debug, Default)]
pub struct FaultCounter(std::sync::atomic::AtomicU64);

impl FaultCounter {
    /// Count one fault. Returns the running count when this one should be
    /// logged: the first ten, then every power of two.
    pub fn hit(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        (n <= 10 || n.is_power_of_two()).then_some(n)
    }

    /// Faults so far.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod fault_tests {
    #[test]
    fn logs_the_first_ten_then_powers_of_two() {
        let c = super::FaultCounter::default();
        let logged: Vec<u64> = (0..100).filter_map(|_| c.hit()).collect();
        assert_eq!(logged, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 32, 64]);
        assert_eq!(c.get(), 100);
    }
}

/// The current frontend's guest memory, as a backend's queue threads read
/// it: set on every SET_MEM_TABLE, read once per batch of requests.
#[derive(Default)]
pub struct MemorySlot(
    std::sync::RwLock<Option<vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap>>>,
);

impl MemorySlot {
    /// A new memory table (VhostUserBackend::update_memory).
    pub fn set(
        &self,
        mem: vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap>,
    ) -> std::io::Result<()> {
        *self
            .0
            .write()
            .map_err(|_| std::io::Error::other("memory lock poisoned"))? = Some(mem);
        Ok(())
    }

    /// The memory now, if a frontend has set one.
    pub fn memory(&self) -> Option<vm_memory::GuestMemoryLoadGuard<vm_memory::GuestMemoryMmap>> {
        use vm_memory::GuestAddressSpace;
        Some(self.0.read().ok()?.as_ref()?.memory())
    }

    /// Whether `vring` has requests made available and not yet taken
    /// (None: the ring cannot be read, or no memory is mapped).
    pub fn ring_pending(&self, vring: &vhost_user_backend::VringRwLock) -> Option<bool> {
        Self::pending(&*self.memory()?, vring)
    }

    fn pending(
        mem: &vm_memory::GuestMemoryMmap,
        vring: &vhost_user_backend::VringRwLock,
    ) -> Option<bool> {
        use vhost_user_backend::VringT;
        use virtio_queue::QueueT;
        let state = vring.get_ref();
        let q = state.get_queue();
        if !q.ready() {
            return None;
        }
        q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .ok()
            .map(|idx| idx.0 != q.next_avail())
    }

    /// Spin on `vring`'s available index for up to `window`, for a queue
    /// thread that has just served everything (with kicks still off): a
    /// driver that makes its next request available soon is then served
    /// without a kick or a wake-up. Returns whether one arrived.
    pub fn poll_ring(
        &self,
        vring: &vhost_user_backend::VringRwLock,
        window: std::time::Duration,
    ) -> bool {
        if window.is_zero() {
            return false;
        }
        let Some(mem) = self.memory() else {
            return false;
        };
        let deadline = std::time::Instant::now() + window;
        loop {
            match Self::pending(&mem, vring) {
                Some(true) => return true,
                Some(false) => {}
                None => return false,
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            poll_pause();
        }
    }
}

/// One turn of a loop that polls a ring: any other thread runnable on
/// this CPU goes first. The reply just sent may have woken the driver (or
/// the VMM thread that injects its interrupt) onto the polling thread's
/// CPU; a plain spin would keep it waiting for the whole window, delaying
/// the very request being waited for. With nothing else runnable this
/// returns at once, so the spin costs the same latency as before.
pub fn poll_pause() {
    // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
    unsafe { libc::sched_yield() };
}
