//! The vhost-user test frontend: spawn (or connect to) a backend, negotiate,
//! share guest memory, set up split virtqueues, and read config space.
//!
//! It speaks the protocol through `vhost::vhost_user::Frontend`, the same
//! code a VMM would use, so a backend that passes here talks to a real
//! frontend, not to a mock.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vm_memory::GuestMemory;

use crate::memory::{GuestMem, MemoryError};
use crate::ring::{RingError, SplitRing};

/// virtio feature: the device conforms to virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// virtio feature: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// virtio feature: used_event / avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// vhost-user feature bit: protocol features may be negotiated.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Errors of the test frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("spawning backend `{cmd}`")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("backend exited before serving {socket}: {status}\n--- backend output ---\n{output}")]
    BackendExited {
        socket: PathBuf,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("backend did not serve {socket} within {timeout:?}\n--- backend output ---\n{output}")]
    NotServing {
        socket: PathBuf,
        timeout: Duration,
        output: String,
    },
    #[error("connecting to {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("vhost-user {step}")]
    Vhost {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the backend offers features {offered:#x}, which lack required {missing:#x}")]
    MissingFeatures { offered: u64, missing: u64 },
    #[error("queue {0} is out of range ({1} queues)")]
    NoQueue(usize, usize),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("temporary directory")]
    TempDir(#[source] std::io::Error),
}

fn vh(step: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::Vhost { step, source }
}

/// A backend process serving a Unix socket in a private temporary directory.
/// Killed (SIGKILL) on drop; its output is kept for failure messages.
pub struct BackendProcess {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    first: Option<UnixStream>,
    _dir: tempfile::TempDir,
}

impl BackendProcess {
    /// Spawn `argv` and wait until it serves. `{socket}` in an argument
    /// becomes the socket path the backend should listen on; `{fd}` makes the
    /// frontend create the listening socket itself and pass its descriptor
    /// (as a supervisor does), so the backend is reachable at once.
    pub fn spawn<S: AsRef<str>>(argv: &[S], timeout: Duration) -> Result<Self, FrontendError> {
        let dir = tempfile::Builder::new()
            .prefix("vu-backend")
            .tempdir()
            .map_err(FrontendError::TempDir)?;
        let socket = dir.path().join("vhost.sock");
        let log = dir.path().join("backend.log");
        let spawn_err = |cmd: &str, source| FrontendError::Spawn {
            cmd: cmd.to_string(),
            source,
        };
        let listener = if argv.iter().any(|a| a.as_ref().contains("{fd}")) {
            Some(
                std::os::unix::net::UnixListener::bind(&socket)
                    .map_err(|e| spawn_err("bind", e))?,
            )
        } else {
            None
        };
        let fd = listener
            .as_ref()
            .map(|l| l.as_raw_fd().to_string())
            .unwrap_or_default();
        let args: Vec<String> = argv
            .iter()
            .map(|a| {
                a.as_ref()
                    .replace("{socket}", &socket.to_string_lossy())
                    .replace("{fd}", &fd)
            })
            .collect();
        let cmd = args.join(" ");
        let Some((prog, rest)) = args.split_first() else {
            return Err(spawn_err(
                &cmd,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command line"),
            ));
        };
        let out = File::create(&log).map_err(|e| spawn_err(&cmd, e))?;
        let err = out.try_clone().map_err(|e| spawn_err(&cmd, e))?;
        let mut command = Command::new(prog);
        command
            .args(rest)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let inherit = listener.as_ref().map(|l| l.as_raw_fd());
        // SAFETY: the hook runs in the forked child before exec and only calls
        // prctl and fcntl, which are async-signal-safe. The listener stays
        // close-on-exec in this process, so no other child inherits it.
        unsafe {
            command.pre_exec(move || {
                // Die with the thread that spawned us: an aborted test leaves
                // no backend behind.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                match inherit {
                    Some(fd) => clear_cloexec(&fd),
                    None => Ok(()),
                }
            });
        }
        let child = command.spawn().map_err(|e| spawn_err(&cmd, e))?;
        let mut me = BackendProcess {
            child: Some(child),
            socket,
            log,
            first: None,
            _dir: dir,
        };
        // A pre-bound socket is served by construction: connections queue
        // until the backend accepts. Probing would even be harmful there,
        // since virtiofsd serves exactly one frontend and then exits.
        if listener.is_none() {
            me.wait_serving(timeout)?;
        }
        Ok(me)
    }

    /// Poll-connect until the socket is served; fail early if the child exits.
    /// The connection is kept for `stream`: some backends (virtiofsd) exit
    /// when their first frontend hangs up, so a probe must not be dropped.
    fn wait_serving(&mut self, timeout: Duration) -> Result<(), FrontendError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(1);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(FrontendError::BackendExited {
                        socket: self.socket.clone(),
                        status,
                        output: self.output(),
                    });
                }
            }
            if let Ok(s) = UnixStream::connect(&self.socket) {
                self.first = Some(s);
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(FrontendError::NotServing {
                    socket: self.socket.clone(),
                    timeout,
                    output: self.output(),
                });
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    /// A connection to the backend: the one readiness was proven with, then
    /// fresh ones (for reconnect tests).
    pub fn stream(&mut self) -> Result<UnixStream, FrontendError> {
        match self.first.take() {
            Some(s) => Ok(s),
            None => UnixStream::connect(&self.socket)
                .map_err(|e| FrontendError::Connect(self.socket.clone(), e)),
        }
    }

    /// Connect and bring the device up.
    pub fn device(&mut self, opts: &DeviceOptions) -> Result<VuDevice, FrontendError> {
        let s = self.stream()?;
        VuDevice::from_stream(s, opts)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The process that serves: with a namespace sandbox, the child the
    /// started process forked into the new pid namespace; else itself.
    pub fn serving_pid(&self) -> Option<u32> {
        let pid = self.pid()?;
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        Some(
            children
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(pid),
        )
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Everything the backend printed so far.
    pub fn output(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// SIGKILL the backend and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the frontend asks of a device.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Number of virtqueues to set up.
    pub queues: usize,
    /// Entries per queue.
    pub queue_size: u16,
    /// Negotiate EVENT_IDX if the backend offers it.
    pub event_idx: bool,
    /// Device feature bits (0..24) to accept when offered.
    pub device_features: u64,
    /// Feature bits the backend must offer, or setup fails.
    pub required_features: u64,
    /// Size of each of the two guest memory regions.
    pub region_size: u64,
    /// Negotiate the inflight area (INFLIGHT_SHMFD) and set it up with
    /// GET_INFLIGHT_FD and SET_INFLIGHT_FD before the queues, as QEMU does.
    pub inflight: bool,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            queues: 1,
            queue_size: 256,
            event_idx: true,
            device_features: 0,
            required_features: VIRTIO_F_VERSION_1,
            region_size: 64 << 20,
            inflight: false,
        }
    }
}

/// A configured vhost-user device: negotiated, memory shared, queues live.
pub struct VuDevice {
    frontend: Frontend,
    pub mem: GuestMem,
    pub queues: Vec<SplitRing>,
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    /// The inflight area, when asked for and offered.
    pub inflight: Option<(vhost::vhost_user::message::VhostUserInflight, std::fs::File)>,
}

impl VuDevice {
    /// Connect to a served socket and bring the device up.
    pub fn connect(socket: &Path, opts: &DeviceOptions) -> Result<Self, FrontendError> {
        let frontend = Frontend::connect(socket, opts.queues as u64)
            .map_err(|e| FrontendError::Connect(socket.to_path_buf(), std::io::Error::other(e)))?;
        Self::setup(frontend, opts)
    }

    /// Bring the device up over an already connected stream.
    pub fn from_stream(stream: UnixStream, opts: &DeviceOptions) -> Result<Self, FrontendError> {
        Self::setup(Frontend::from_stream(stream, opts.queues as u64), opts)
    }

    fn setup(mut frontend: Frontend, opts: &DeviceOptions) -> Result<Self, FrontendError> {
        frontend.set_owner().map_err(vh("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(vh("GET_FEATURES"))?;
        let missing = opts.required_features & !offered;
        if missing != 0 {
            return Err(FrontendError::MissingFeatures { offered, missing });
        }
        let mut wanted = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VHOST_USER_F_PROTOCOL_FEATURES
            | (opts.device_features & 0x00ff_ffff);
        if opts.event_idx {
            wanted |= VIRTIO_RING_F_EVENT_IDX;
        }
        let features = offered & wanted;

        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let pf = frontend
                .get_protocol_features()
                .map_err(vh("GET_PROTOCOL_FEATURES"))?;
            let mut want = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK;
            if opts.inflight {
                want |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
            }
            protocol_features = pf & want;
            frontend
                .set_protocol_features(protocol_features)
                .map_err(vh("SET_PROTOCOL_FEATURES"))?;
        }
        frontend
            .set_features(features)
            .map_err(vh("SET_FEATURES"))?;

        let mut mem = GuestMem::new(opts.region_size)?;
        frontend
            .set_mem_table(&mem.region_infos()?)
            .map_err(vh("SET_MEM_TABLE"))?;

        let mut inflight = None;
        if protocol_features.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            use std::os::fd::AsRawFd;
            let ask = vhost::vhost_user::message::VhostUserInflight {
                num_queues: opts.queues as u16,
                queue_size: opts.queue_size,
                ..Default::default()
            };
            let (info, file) = frontend
                .get_inflight_fd(&ask)
                .map_err(vh("GET_INFLIGHT_FD"))?;
            frontend
                .set_inflight_fd(&info, file.as_raw_fd())
                .map_err(vh("SET_INFLIGHT_FD"))?;
            inflight = Some((info, file));
        }
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(opts.queues);
        for i in 0..opts.queues {
            let ring = SplitRing::new(&mut mem, opts.queue_size, event_idx)?;
            start_queue(&mut frontend, &mem, i, &ring)?;
            queues.push(ring);
        }
        Ok(VuDevice {
            frontend,
            mem,
            queues,
            features,
            protocol_features,
            inflight,
        })
    }

    /// The underlying frontend, for messages this type does not wrap.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Read `len` bytes of device config space at `offset` (GET_CONFIG).
    pub fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, FrontendError> {
        let buf = vec![0u8; len as usize];
        let (_, data) = self
            .frontend
            .get_config(offset, len, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(vh("GET_CONFIG"))?;
        Ok(data)
    }

    /// Write device config space (SET_CONFIG).
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        self.frontend
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(vh("SET_CONFIG"))
    }

    /// Queue `idx`.
    pub fn queue(&mut self, idx: usize) -> Result<&mut SplitRing, FrontendError> {
        let n = self.queues.len();
        self.queues
            .get_mut(idx)
            .ok_or(FrontendError::NoQueue(idx, n))
    }

    /// Whether a feature bit was negotiated.
    pub fn has_feature(&self, bit: u64) -> bool {
        self.features & bit != 0
    }
}

/// SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE for one ring.
fn start_queue(
    fe: &mut Frontend,
    mem: &GuestMem,
    idx: usize,
    ring: &SplitRing,
) -> Result<(), FrontendError> {
    let a = ring.addrs();
    // vhost-user ring addresses are the frontend's virtual addresses; the
    // backend translates them through the memory table.
    let va = |g| -> Result<u64, FrontendError> {
        mem.mem()
            .get_host_address(g)
            .map(|p| p as u64)
            .map_err(|e| FrontendError::Ring(RingError::Access(e)))
    };
    fe.set_vring_num(idx, ring.size())
        .map_err(vh("SET_VRING_NUM"))?;
    fe.set_vring_addr(
        idx,
        &VringConfigData {
            queue_max_size: ring.size(),
            queue_size: ring.size(),
            flags: 0,
            desc_table_addr: va(a.desc)?,
            used_ring_addr: va(a.used)?,
            avail_ring_addr: va(a.avail)?,
            log_addr: None,
        },
    )
    .map_err(vh("SET_VRING_ADDR"))?;
    fe.set_vring_base(idx, 0).map_err(vh("SET_VRING_BASE"))?;
    fe.set_vring_call(idx, ring.call_fd())
        .map_err(vh("SET_VRING_CALL"))?;
    fe.set_vring_kick(idx, ring.kick_fd())
        .map_err(vh("SET_VRING_KICK"))?;
    fe.set_vring_enable(idx, true)
        .map_err(vh("SET_VRING_ENABLE"))?;
    Ok(())
}

pub use orchestrator::find_program;

fn clear_cloexec(fd: &impl AsRawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags & !libc::FD_CLOEXEC) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
