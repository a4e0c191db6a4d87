//! blk-backend: a vhost-user virtio-blk backend over raw images and block
//! devices, one process per disk.
//!
//! - [`args`]: the command line, turned into a [`Config`].
//! - [`request`]: descriptor chains to checked requests.
//! - [`io`]: the io_uring and thread-pool engines.
//! - [`backend`]: queues to engines and back.

pub mod args;
pub mod backend;
pub mod fuzz;
pub mod io;
pub mod request;
pub mod seccomp;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use args::IoEngine;
use backend::{BlkBackend, Disk, Hooks};
use backend_common::sandbox;
use tracing::{info, warn};

pub use args::{Args, Config};

/// Errors that stop the backend.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open the image {path}{hint}")]
    Image {
        path: std::path::PathBuf,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is neither a regular file nor a block device")]
    NotADisk(std::path::PathBuf),
    #[error("{0} is in use by another process (it holds a lock on it); stop that one first")]
    Locked(std::path::PathBuf),
    #[error("setting up the {engine} engine: {source}")]
    Engine {
        engine: &'static str,
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

/// Serve the image on the configured socket until told to stop (or, with
/// `connections`, after that many frontends).
pub fn run(cfg: &Config) -> Result<(), RunError> {
    let listener = cfg.socket.listen()?;
    let notifier = backend_common::notify::Notifier::from_env();
    let mut disk = open_disk(cfg)?;
    let bounce_why = bounce_from(cfg, &mut disk);
    disk.hold_writes_to_capacity()
        .map_err(|source| RunError::Image {
            path: cfg.image.clone(),
            hint: " (setting RLIMIT_FSIZE to the disk's size)",
            source,
        })?;
    let disk = Arc::new(disk);
    let mut keep = disk.fds();
    keep.push(listener.as_raw_fd());
    keep.extend(notifier.as_ref().map(|n| n.fd()));
    // Only the image and the socket stay open.
    sandbox::confine(cfg.sandbox, &keep)?;
    let engines = make_engines(cfg, &disk.fds())?;
    let engine_name = engines.first().map(|e| e.name()).unwrap_or("none");
    if let Some(n) = &notifier {
        n.ready();
    }
    backend_common::seccomp::install(&seccomp::allowlist(), &seccomp::ioctls(), cfg.seccomp)?;
    info!(
        image = %cfg.image.display(),
        bytes = disk.capacity(),
        readonly = cfg.readonly,
        direct = cfg.direct,
        engine = engine_name,
        queues = cfg.num_queues,
        sandbox = ?cfg.sandbox,
        "serving"
    );
    if let Some(why) = bounce_why {
        info!(
            from_bytes = disk.bounce_from,
            why, "O_DIRECT transfers go through huge-page buffers"
        );
    }
    let backend = Arc::new(BlkBackend::new(disk, engines, cfg.queue_size, cfg.poll));
    if cfg.resize_poll_ms > 0 {
        watch_size(
            Arc::clone(&backend),
            Duration::from_millis(cfg.resize_poll_ms),
        );
    }
    backend_common::serve_with_hooks(
        "blk-backend",
        &listener,
        Arc::clone(&backend),
        cfg.connections,
        &Hooks(backend),
    )?;
    Ok(())
}

fn open_disk(cfg: &Config) -> Result<Disk, RunError> {
    let path = &cfg.image;
    let open = |direct: bool| -> Result<File, RunError> {
        let mut o = OpenOptions::new();
        o.read(true).write(!cfg.readonly);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path).map_err(|source| {
            if source.raw_os_error() == Some(libc::EISDIR) {
                return RunError::NotADisk(path.clone());
            }
            RunError::Image {
                path: path.clone(),
                hint: hint(&source, direct),
                source,
            }
        })
    };
    let file = open(cfg.direct)?;
    let ft = file
        .metadata()
        .map_err(|source| RunError::Image {
            path: path.clone(),
            hint: "",
            source,
        })?
        .file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(RunError::NotADisk(path.clone()));
    }
    lock(&file, cfg.readonly, path)?;
    let buffered = if cfg.direct { Some(open(false)?) } else { None };
    Disk::new(
        file,
        buffered,
        cfg.logical_block_size,
        cfg.readonly,
        cfg.serial.clone(),
    )
    .map_err(|source| RunError::Image {
        path: path.clone(),
        hint: "",
        source,
    })
}

/// Set the disk's bounce threshold from `--bounce`; returns why, when
/// transfers bounce.
fn bounce_from(cfg: &Config, disk: &mut Disk) -> Option<String> {
    let (from, why) = match cfg.bounce {
        _ if !cfg.direct => return None,
        args::Bounce::From(n) => (n, "--bounce".to_string()),
        args::Bounce::Auto => (
            args::BOUNCE_AUTO_FROM,
            io::bounce::segment_bound_disk(disk.file())?,
        ),
    };
    disk.bounce_from = from;
    (from > 0).then_some(why)
}

fn hint(e: &std::io::Error, direct: bool) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EINVAL) if direct => {
            " (the filesystem refuses O_DIRECT, as tmpfs does; run without --direct)"
        }
        Some(libc::EACCES) | Some(libc::EROFS) => {
            " (no write access; pass --readonly to serve it read-only)"
        }
        Some(libc::ENOENT) => " (create it first, e.g. `truncate -s 10G IMAGE`)",
        _ => "",
    }
}

/// One writer per image: an exclusive lock, or a shared one when read-only,
/// so two backends never write the same image. A backend that was just
/// killed (a supervisor restarting it) may take a moment to let go, so a
/// held lock is retried for a few seconds before giving up.
fn lock(file: &File, readonly: bool, path: &Path) -> Result<(), RunError> {
    let how = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        // SAFETY: flock on our own descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            // A filesystem without locks is no reason to refuse the disk.
            warn!(error = %e, "cannot lock the image");
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(RunError::Locked(path.to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn make_engines(
    cfg: &Config,
    files: &[std::os::fd::RawFd],
) -> Result<Vec<Box<dyn io::Engine>>, RunError> {
    let depth = cfg.queue_size as u32;
    let mut engines: Vec<Box<dyn io::Engine>> = Vec::new();
    let mut use_uring = cfg.io_engine != IoEngine::Threads;
    for q in 0..cfg.num_queues {
        if use_uring {
            match io::uring::UringEngine::new(depth, files) {
                Ok(e) if !cfg.direct && cfg.pool_reads_from > 0 => {
                    let e = io::split::SplitEngine::new(
                        e,
                        cfg.pool_threads,
                        &format!("q{q}"),
                        cfg.pool_reads_from,
                    )
                    .map_err(|source| RunError::Engine {
                        engine: "thread-pool",
                        source,
                    })?;
                    engines.push(Box::new(e));
                    continue;
                }
                Ok(e) => {
                    engines.push(Box::new(e));
                    continue;
                }
                Err(source) if cfg.io_engine == IoEngine::Uring => {
                    return Err(RunError::Engine {
                        engine: "io_uring",
                        source,
                    })
                }
                Err(e) => {
                    warn!(error = %e, "io_uring refused; using the thread-pool engine");
                    use_uring = false;
                }
            }
        }
        let e = io::threads::ThreadEngine::new(cfg.pool_threads, &format!("q{q}")).map_err(
            |source| RunError::Engine {
                engine: "thread-pool",
                source,
            },
        )?;
        engines.push(Box::new(e));
    }
    Ok(engines)
}

/// Re-read the image's size now and then, so GET_CONFIG reports a grown or
/// shrunk image, requests are checked against its real end, and the
/// frontend hears of the change.
fn watch_size(backend: Arc<BlkBackend>, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("resize".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let disk = &backend.disk;
            match disk.refresh_capacity() {
                Ok(true) => info!(
                    bytes = disk.capacity(),
                    notified = backend.config_changed(),
                    "the image changed size"
                ),
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot read the image's size"),
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot watch the image's size");
    }
}
