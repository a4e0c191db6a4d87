//! net-backend: a vhost-user virtio-net backend, one process per NIC.
//!
//! - [`args`]: the command line, turned into a [`Config`].
//! - [`link`]: where frames go (a tap, or a socket peer such as passt).
//! - [`backend`]: the queue pair to the link and back.
//! - [`uring`]: batched transmit into a tap through a locked-down io_uring.

pub mod args;
pub mod backend;
pub mod fuzz;
pub mod link;
pub mod uring;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use args::{LinkChoice, SocketType, TxEngine};
use backend::{Hooks, NetBackend};
use backend_common::sandbox;
use libc::c_long;

pub use args::{Args, Config};

/// Errors that stop the backend.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("opening the link {what}{hint}")]
    Link {
        what: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Setup(#[from] backend_common::SetupError),
    #[error(transparent)]
    Serve(#[from] backend_common::ServeError),
    #[error("setting up the sandbox")]
    Sandbox(#[from] backend_common::sandbox::SandboxError),
    #[error("installing the seccomp filter")]
    Seccomp(#[from] backend_common::seccomp::SeccompError),
}

/// Serve the NIC until told to stop (or after `connections` frontends).
pub fn run(cfg: &Config) -> Result<(), RunError> {
    let notifier = backend_common::notify::Notifier::from_env();
    // The link first: once the socket listens, a frontend (or a test) may
    // assume the tap exists.
    let links = open_links(cfg)?;
    let listener = cfg.socket.listen()?;
    let mut keep = vec![listener.as_raw_fd()];
    keep.extend(links.iter().flat_map(|l| l.fds()));
    keep.extend(notifier.as_ref().map(|n| n.fd()));
    // Only the link and the sockets stay open.
    sandbox::confine(cfg.sandbox, &keep)?;
    if let Some(n) = &notifier {
        n.ready();
    }
    backend_common::seccomp::install(&allowlist(), &ioctls(), cfg.seccomp)?;
    tracing::info!(
        link = links[0].name(),
        pairs = links.len(),
        mac = ?cfg.mac,
        mtu = cfg.mtu,
        "serving"
    );
    let backend =
        Arc::new(NetBackend::new(links, cfg.mac, cfg.mtu, cfg.queue_size).with_tx_poll(cfg.poll));
    backend_common::serve_with_hooks(
        "net-backend",
        &listener,
        Arc::clone(&backend),
        cfg.connections,
        &Hooks(backend),
    )?;
    Ok(())
}

/// The links, one per queue pair.
fn open_links(cfg: &Config) -> Result<Vec<Arc<dyn link::Link>>, RunError> {
    let as_links = |v: Vec<link::Tap>| {
        let mut refused = None;
        let links: Vec<_> = v
            .into_iter()
            .map(|mut t| {
                // The ring is opened here, before the sandbox and the
                // seccomp filter, which then allow io_uring_enter only.
                if cfg.tx_engine == TxEngine::Uring && refused.is_none() {
                    if let Err(e) = t.enable_tx_ring() {
                        refused = Some(e);
                    }
                }
                t
            })
            .map(|t| Arc::new(t) as Arc<dyn link::Link>)
            .collect();
        match refused {
            Some(e) => tracing::warn!(
                error = %e,
                "io_uring refused; transmitting with one writev per frame (--tx-engine=writev \
                 says so without trying)"
            ),
            None if cfg.tx_engine == TxEngine::Uring => {
                tracing::info!("transmitting in batches through io_uring")
            }
            None => {}
        }
        links
    };
    Ok(match &cfg.link {
        LinkChoice::Tap(name) => as_links(link::Tap::open_queues(name, cfg.queue_pairs).map_err(|source| {
            RunError::Link {
                what: format!("tap {name}"),
                hint: match source.raw_os_error() {
                    Some(libc::EPERM) => " (creating a tap needs CAP_NET_ADMIN; or let a supervisor open it and pass --tap-fd)",
                    Some(libc::EBUSY) => " (another process has it open; is another net-backend still running on it?)",
                    _ => "",
                },
                source,
            }
        })?),
        LinkChoice::TapFds(fds) => as_links(
            fds.iter()
                .map(|&fd| {
                    link::Tap::from_fd(fd).map_err(|source| RunError::Link {
                        what: format!("--tap-fd {fd}"),
                        hint: "",
                        source,
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
        LinkChoice::Socket(p, kind) => {
            let what = format!("socket {}", p.display());
            let hint = |source: &std::io::Error| match (source.raw_os_error(), kind) {
                (Some(libc::EPROTOTYPE), SocketType::Seqpacket) => {
                    " (that socket is not SOCK_SEQPACKET: for a datagram socket add --socket-type=dgram)"
                }
                (Some(libc::EPROTOTYPE), SocketType::Dgram) => {
                    " (that socket is not SOCK_DGRAM: leave out --socket-type=dgram for a SOCK_SEQPACKET one)"
                }
                (Some(libc::EPROTOTYPE), SocketType::Stream) => {
                    " (that socket is not SOCK_STREAM: leave out --socket-type=stream for a SOCK_SEQPACKET one)"
                }
                (_, SocketType::Stream) => {
                    " (the peer must be listening there, e.g. passt -f -s PATH)"
                }
                _ => " (the peer must be listening there, e.g. net-backend --socket-listen)",
            };
            let l: Arc<dyn link::Link> = match kind {
                SocketType::Seqpacket => Arc::new(link::Seqpacket::connect(p).map_err(|source| {
                    RunError::Link { what: what.clone(), hint: hint(&source), source }
                })?),
                SocketType::Dgram => Arc::new(link::Dgram::connect(p).map_err(|source| {
                    RunError::Link { what: what.clone(), hint: hint(&source), source }
                })?),
                SocketType::Stream => Arc::new(link::Stream::connect(p).map_err(|source| {
                    RunError::Link { what: what.clone(), hint: hint(&source), source }
                })?),
            };
            vec![l]
        }
        LinkChoice::SocketListen(p, kind) => {
            let what = format!("listening socket {}", p.display());
            let l: Arc<dyn link::Link> = match kind {
                SocketType::Seqpacket => Arc::new(link::SeqpacketListener::bind(p).map_err(|source| {
                    RunError::Link { what: what.clone(), hint: "", source }
                })?),
                SocketType::Dgram => Arc::new(link::Dgram::bind(p).map_err(|source| {
                    RunError::Link { what: what.clone(), hint: "", source }
                })?),
                SocketType::Stream => {
                    return Err(RunError::Link {
                        what,
                        hint: " (a stream link connects: use --socket)",
                        source: std::io::Error::from(std::io::ErrorKind::Unsupported),
                    })
                }
            };
            vec![l]
        }
    })
}

/// The ioctl requests net-backend makes once it is serving: a multiqueue
/// tap attaches and detaches queues (TUNSETQUEUE) and the offloads follow
/// the features the guest agrees (TUNSETOFFLOAD). Taps are opened and
/// configured before the filter.
pub fn ioctls() -> Vec<u32> {
    let mut v = backend_common::seccomp::IOCTLS.to_vec();
    v.extend_from_slice(&[link::TUNSETQUEUE as u32, link::TUNSETOFFLOAD as u32]);
    v
}

/// The syscalls net-backend needs once it is serving.
pub fn allowlist() -> Vec<c_long> {
    let mut v = backend_common::seccomp::common();
    v.extend_from_slice(&[
        libc::SYS_readv,
        libc::SYS_writev,
        // Batched transmit (the ring is set up before the filter, and can
        // only write to its tap).
        libc::SYS_io_uring_enter,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        // The message shim's private socket, one per frontend.
        libc::SYS_socket,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        // A listening link accepts its peer and polls its private epoll
        // set.
        libc::SYS_accept4,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        // A stream link waits for room in its socket.
        libc::SYS_poll,
        libc::SYS_ppoll,
    ]);
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use backend_common::seccomp::ioctl_is_refused;

    #[test]
    fn refuses_every_ioctl_but_its_own() {
        let (list, ioctls) = (super::allowlist(), super::ioctls());
        // TIOCSTI, TUNSETIFF (a new tap) and SIOCSIFADDR (an address).
        for req in [libc::TIOCSTI as u32, super::link::TUNSETIFF as u32, 0x8916] {
            assert!(ioctl_is_refused(&list, &ioctls, req), "{req:#x} passes");
        }
        for req in [super::link::TUNSETQUEUE, super::link::TUNSETOFFLOAD] {
            assert!(
                !ioctl_is_refused(&list, &ioctls, req as u32),
                "{req:#x} refused"
            );
        }
    }
}
