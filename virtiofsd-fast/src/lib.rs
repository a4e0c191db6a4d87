//! virtiofsd-fast: a vhost-user virtio-fs backend.
//!
//! - [`args`]: the virtiofsd-compatible command line, turned into a [`Config`].
//! - [`share`]: the shared directory as a FUSE filesystem: each request as
//!   syscalls relative to descriptors, with our boundary and cache policy.
//! - [`store`]: the inode store behind it (node IDs to host files, bounded
//!   descriptors, file handles).
//! - [`ledger`]: the guest's session kept in a file (`--state-file`), so a
//!   restarted daemon resumes it.
//! - [`backend`]: virtqueues to FUSE requests and back.

pub mod args;
pub mod backend;
pub mod fuzz;
pub mod ledger;
pub mod seccomp;
pub mod share;
pub mod store;

use std::sync::Arc;

use args::SandboxMode;
use backend_common::sandbox::{self, cap};

pub use args::{Args, Config};

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("opening the shared directory")]
    Share(#[source] std::io::Error),
    #[error(transparent)]
    Setup(#[from] backend_common::SetupError),
    #[error(transparent)]
    Serve(#[from] backend_common::ServeError),
    #[error("setting up the sandbox")]
    Sandbox(#[from] backend_common::sandbox::SandboxError),
    #[error("starting the thread pool")]
    Pool(#[source] std::io::Error),
    #[error("opening the state file {path}")]
    StateFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("installing the seccomp filter")]
    Seccomp(#[from] backend_common::seccomp::SeccompError),
}

/// Serve the share on the configured socket until told to stop (or, with
/// `connections`, after that many frontends).
pub fn run(cfg: &Config) -> Result<(), RunError> {
    // Everything from outside the share is opened first: the socket, then
    // (after the namespaces exist) the /proc handles of the filesystem.
    let listener = cfg.socket.listen()?;
    // Nothing inherited by accident is reachable from guest-facing code.
    {
        use std::os::fd::AsRawFd;
        sandbox::close_other_fds(&[listener.as_raw_fd()])?;
    }
    let notifier = backend_common::notify::Notifier::from_env();
    raise_nofile(cfg.rlimit_nofile.unwrap_or(DEFAULT_NOFILE));
    let ledger = match &cfg.state_file {
        Some(path) => {
            let (l, resumed) = ledger::Ledger::open(path).map_err(|e| RunError::StateFile {
                path: path.clone(),
                source: e,
            })?;
            Some((Arc::new(l), resumed))
        }
        None => None,
    };
    // The filesystem opens /proc/self/fd when it is made, so it is made
    // where it will run: inside the jail (whose /proc is this pid
    // namespace's), or before the chroot (which has no /proc).
    let mut fs = match cfg.sandbox {
        SandboxMode::Namespace => {
            sandbox::enter_namespaces()?;
            sandbox::pivot_into_jail(&cfg.shared_dir)?;
            share::ShareFs::new(cfg, sandbox::JAIL_SHARE)
        }
        SandboxMode::Chroot => {
            let fs = share::ShareFs::new(cfg, "/");
            sandbox::chroot_into(&cfg.shared_dir)?;
            fs
        }
        SandboxMode::None => share::ShareFs::new(cfg, &cfg.shared_dir.to_string_lossy()),
    }
    .map_err(RunError::Share)?;
    if let Some((l, resumed)) = &ledger {
        fs.attach_ledger(l.clone(), resumed.as_ref());
    }
    fs.import().map_err(RunError::Share)?;
    if let Some((_, Some(r))) = &ledger {
        if fs.resume(r) {
            tracing::info!(
                nodes = r.nodes,
                open_files = r.handles,
                "resuming the guest's session a previous daemon left"
            );
        } else {
            tracing::warn!("the state file's session was for another shared directory: dropped");
        }
    }
    sandbox::drop_capabilities(KEEP_CAPS)?;
    if let Some(n) = &notifier {
        n.ready();
    }
    // Last, once nothing is left to set up: from here on only the
    // syscalls serving the guest needs are allowed.
    backend_common::seccomp::install(&seccomp::allowlist(), &seccomp::ioctls(), cfg.seccomp)?;
    let backend = Arc::new(backend::FsBackend::new(
        fs,
        cfg.tag.clone(),
        cfg.request_queues,
        cfg.poll,
    ));
    tracing::info!(
        shared_dir = %cfg.shared_dir.display(),
        cache = ?cfg.cache,
        coherence_ms = cfg.coherence.as_millis() as u64,
        sandbox = ?cfg.sandbox,
        capabilities = format!("{:#x}", sandbox::effective_capabilities().unwrap_or(0)),
        "serving"
    );
    backend
        .start_pool(cfg.thread_pool_size)
        .map_err(RunError::Pool)?;
    let hooks = backend::Hooks(backend.clone());
    backend_common::serve_with_hooks(
        "virtiofsd-fast",
        &listener,
        backend,
        cfg.connections,
        &hooks,
    )?;
    Ok(())
}

/// What a passthrough filesystem needs to act for any guest user: change
/// owners and modes, pass permission checks the guest already made, open by
/// file handle, switch credentials, make device nodes and fifos.
const KEEP_CAPS: &[u32] = &[
    cap::CHOWN,
    cap::DAC_OVERRIDE,
    cap::DAC_READ_SEARCH,
    cap::FOWNER,
    cap::FSETID,
    cap::SETGID,
    cap::SETUID,
    cap::MKNOD,
    cap::SETFCAP,
];

/// The open-file limit asked for by default, as virtiofsd does: the inode
/// store keeps descriptors for up to half of it before it falls back to
/// file handles, and `--inode-file-handles=never` keeps one per node.
const DEFAULT_NOFILE: u64 = 1_000_000;

/// Raise RLIMIT_NOFILE towards `want`: the soft limit up to the hard one,
/// and with privilege the hard one too, up to the kernel's fs.nr_open.
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`, a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(lim.rlim_max);
    let want = want.min(nr_open);
    if want <= lim.rlim_cur {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(lim.rlim_max),
    };
    // SAFETY: setrlimit reads `raised`, a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return;
    }
    // Unprivileged: the hard limit is as far as we may go.
    let soft = libc::rlimit {
        rlim_cur: want.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } != 0 || soft.rlim_cur < want {
        tracing::warn!(
            want,
            got = soft.rlim_cur,
            "could not raise RLIMIT_NOFILE as far as asked"
        );
    }
}
