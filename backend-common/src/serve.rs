//! The serve loop: one frontend at a time, and serve again when it goes.
//!
//! A VMM restart or a guest reboot closes the vhost-user connection; a
//! backend that exited then would take the device away from a VM that is
//! still running. So each connection gets a fresh daemon (fresh vring state
//! and worker threads), the backend object itself is kept, and the listener
//! goes back to accepting.

use std::os::unix::net::UnixListener;

use std::sync::Arc;

use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringEpollHandler};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Errors that end the serve loop (a frontend's misbehaviour does not).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("duplicating the listening socket")]
    Listener(#[source] std::io::Error),
    // vhost-user-backend's error is Display but not std::error::Error, so
    // it is carried as text.
    #[error("creating the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("accepting a frontend: {0}")]
    Accept(String),
    #[error("preparing a connection's worker threads")]
    Hook(#[source] std::io::Error),
}

/// What a backend does around each connection, beyond what
/// vhost-user-backend does.
pub trait ConnectionHooks<T: VhostUserBackend> {
    /// Before the frontend is accepted: e.g. add the backend's own event
    /// sources (I/O completions) to the worker threads' epoll sets.
    fn start(&self, _handlers: &[Arc<VringEpollHandler<T>>]) -> std::io::Result<()> {
        Ok(())
    }
    /// After the frontend has gone and the workers were told to exit:
    /// e.g. wait out I/O still in flight into that frontend's memory.
    fn end(&self) {}
    /// Put [`crate::shim`] between the frontend and the library (for
    /// frontends that send messages out of the order it accepts).
    fn shim(&self) -> bool {
        false
    }
    /// With the shim: where to leave a copy of the backend channel.
    fn backend_channel(&self) -> Option<crate::shim::ChannelSlot> {
        None
    }
    /// With the shim: keep the inflight area (offered to the frontend) here.
    fn inflight(&self) -> Option<crate::shim::InflightSlot> {
        None
    }
    /// With the shim: call this on each SET_VRING_ENABLE.
    fn ring_enable(&self) -> Option<crate::shim::RingEnableHook> {
        None
    }
    /// With the shim: call this before each GET_VRING_BASE is answered.
    fn ring_stop(&self) -> Option<crate::shim::RingStopHook> {
        None
    }
}

/// No hooks.
pub struct NoHooks;
impl<T: VhostUserBackend> ConnectionHooks<T> for NoHooks {}

/// Serve frontends on `listener`, one after another, `connections` times
/// (`None`: forever). `backend` is cloned into each connection's daemon, so
/// state it shares through `Arc`s survives a reconnect.
pub fn serve<T>(
    name: &str,
    listener: &UnixListener,
    backend: T,
    connections: Option<u64>,
) -> Result<(), ServeError>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: Clone + Send + Sync,
{
    serve_with_hooks(name, listener, backend, connections, &NoHooks)
}

/// [`serve`], calling `hooks` around each connection.
pub fn serve_with_hooks<T, H>(
    name: &str,
    listener: &UnixListener,
    backend: T,
    connections: Option<u64>,
    hooks: &H,
) -> Result<(), ServeError>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: Clone + Send + Sync,
    H: ConnectionHooks<T>,
{
    let mut served = 0u64;
    while connections.is_none_or(|n| served < n) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(name.to_string(), backend.clone(), mem)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        hooks
            .start(&daemon.get_epoll_handlers())
            .map_err(ServeError::Hook)?;
        let relay = if hooks.shim() {
            Some(start_through_shim(
                &mut daemon,
                listener,
                served,
                crate::shim::ShimHooks {
                    channel: hooks.backend_channel(),
                    inflight: hooks.inflight(),
                    ring_enable: hooks.ring_enable(),
                    ring_stop: hooks.ring_stop(),
                },
            )?)
        } else {
            let mut l = Listener::from(listener.try_clone().map_err(ServeError::Listener)?);
            daemon
                .start(&mut l)
                .map_err(|e| ServeError::Accept(e.to_string()))?;
            None
        };
        served += 1;
        info!(connection = served, "frontend connected");
        match daemon.wait() {
            Ok(()) => info!(connection = served, "frontend disconnected"),
            Err(e) => warn!(connection = served, error = %e, "connection ended with an error"),
        }
        // The worker threads of this connection's daemon exit on this event.
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        hooks.end();
        if let Some(r) = relay {
            let _ = r.join();
        }
    }
    Ok(())
}

/// The shim's private listener where the process shares the host's
/// network namespace (see [`PrivateListener`]); unset inside the namespace
/// sandbox, whose abstract socket names nobody else can see.
static PRIVATE: std::sync::OnceLock<PrivateListener> = std::sync::OnceLock::new();

/// A listening socket no other process can find: bound in a fresh private
/// directory, which is removed at once, and reached only through this
/// process's /proc/self/fd link to the socket's inode. (An abstract name
/// would be visible in /proc/net/unix, and another local process could
/// connect to it before the shim does and be served as the frontend.)
pub(crate) struct PrivateListener {
    listener: UnixListener,
    inode: std::os::fd::OwnedFd,
}

impl PrivateListener {
    fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        let template = std::env::temp_dir().join("vmm-shim-XXXXXX");
        let mut t = std::ffi::CString::new(template.as_os_str().as_bytes())
            .map_err(std::io::Error::other)?
            .into_bytes_with_nul();
        // SAFETY: a NUL-terminated template that mkdtemp rewrites in place.
        if unsafe { libc::mkdtemp(t.as_mut_ptr().cast()) }.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        t.pop();
        let dir = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&t));
        let path = dir.join("s");
        let bound = UnixListener::bind(&path).and_then(|l| {
            let c = std::ffi::CString::new(path.as_os_str().as_bytes())
                .map_err(std::io::Error::other)?;
            // SAFETY: a valid C string; the result is checked.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor owned by nobody else.
            Ok((l, unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
        });
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&dir);
        let (listener, inode) = bound?;
        Ok(PrivateListener { listener, inode })
    }

    /// The path the connecting side uses (this process only).
    fn connect_path(&self) -> String {
        use std::os::fd::AsRawFd;
        format!("/proc/self/fd/{}", self.inode.as_raw_fd())
    }
}

/// For a backend that keeps the host's network namespace (`--sandbox
/// none`): make the shim's private listener now, while the process may
/// still create files, so each frontend's shim connection is one nobody
/// else can make. Call before seccomp.
pub(crate) fn prepare_private_shim() -> std::io::Result<()> {
    if PRIVATE.get().is_none() {
        let _ = PRIVATE.set(PrivateListener::new()?);
    }
    Ok(())
}

/// Accept the frontend on `listener`, and start `daemon` on a private
/// socket whose other end a relay thread joins to the frontend through
/// the shim.
fn start_through_shim<T>(
    daemon: &mut VhostUserDaemon<T>,
    listener: &UnixListener,
    n: u64,
    shim_hooks: crate::shim::ShimHooks,
) -> Result<std::thread::JoinHandle<()>, ServeError>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: Clone + Send + Sync,
{
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixStream};
    let (front, _) = listener
        .accept()
        .map_err(|e| ServeError::Accept(e.to_string()))?;
    let (private, connector) = match PRIVATE.get() {
        Some(p) => {
            let path = p.connect_path();
            (
                p.listener.try_clone().map_err(ServeError::Listener)?,
                std::thread::spawn(move || UnixStream::connect(path)),
            )
        }
        None => {
            // Inside the namespace sandbox: the network namespace, and with
            // it the abstract socket names, are this process's alone.
            let name = format!("vmm-shim-{}-{n}", std::process::id());
            let addr =
                SocketAddr::from_abstract_name(name.as_bytes()).map_err(ServeError::Listener)?;
            (
                UnixListener::bind_addr(&addr).map_err(ServeError::Listener)?,
                std::thread::spawn(move || UnixStream::connect_addr(&addr)),
            )
        }
    };
    daemon
        .start(&mut Listener::from(private))
        .map_err(|e| ServeError::Accept(e.to_string()))?;
    let back = connector
        .join()
        .map_err(|_| ServeError::Accept("the shim's connector panicked".into()))?
        .map_err(|e| ServeError::Accept(e.to_string()))?;
    Ok(std::thread::spawn(move || {
        crate::shim::relay(front, back, shim_hooks)
    }))
}
