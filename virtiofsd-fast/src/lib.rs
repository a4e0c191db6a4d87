//! virtiofsd-fast: a vhost-user virtio-fs backend.
//!
//! - [`args`]: the virtiofsd-compatible command line, turned into a [`Config`].
//! - [`share`]: the shared directory as a FUSE filesystem (passthrough plus
//!   our boundary and cache policy).
//! - [`backend`]: virtqueues to FUSE requests and back.

pub mod args;
pub mod backend;
pub mod share;

use std::sync::Arc;

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
}

/// Serve the share on the configured socket until told to stop (or, with
/// `connections`, after that many frontends).
pub fn run(cfg: &Config) -> Result<(), RunError> {
    let listener = cfg.socket.listen()?;
    if let Some(n) = cfg.rlimit_nofile {
        raise_nofile(n);
    } else {
        raise_nofile(u64::MAX);
    }
    let fs = share::ShareFs::new(cfg).map_err(RunError::Share)?;
    let backend = Arc::new(backend::FsBackend::new(fs, cfg.tag.clone(), 1));
    tracing::info!(
        shared_dir = %cfg.shared_dir.display(),
        cache = ?cfg.cache,
        coherence_ms = cfg.coherence.as_millis() as u64,
        "serving"
    );
    backend_common::serve("virtiofsd-fast", &listener, backend, cfg.connections)?;
    Ok(())
}

/// Raise the open-file limit towards `want` (capped at the hard limit): the
/// passthrough layer keeps a descriptor per inode the guest knows.
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`, a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let target = want.min(lim.rlim_max);
    if target > lim.rlim_cur {
        lim.rlim_cur = target;
        // SAFETY: setrlimit reads `lim`, a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            tracing::warn!(want = target, "could not raise RLIMIT_NOFILE");
        }
    }
}
