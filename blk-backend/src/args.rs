//! Command line and the checked configuration it becomes.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use backend_common::SocketSource;

/// Which engine carries the image I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IoEngine {
    /// io_uring where the kernel allows it, else the thread pool.
    Auto,
    /// io_uring: many requests in flight per queue, one thread per queue.
    Uring,
    /// A small pool of threads per queue doing preadv/pwritev.
    Threads,
}

/// Sandboxing of the backend process.
pub use backend_common::sandbox::Confinement as SandboxMode;

/// What seccomp does with a syscall outside the allowlist.
pub use backend_common::seccomp::Action as SeccompAction;

/// blk-backend: a vhost-user virtio-blk backend over a raw image or a
/// block device, one process per disk.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// vhost-user socket to listen on.
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// An already listening vhost-user socket, inherited from a supervisor.
    #[arg(long, value_name = "FD")]
    pub fd: Option<RawFd>,
    /// The disk: a raw image file or a block device.
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// Offer the disk read-only (VIRTIO_BLK_F_RO); the image is opened
    /// read-only too.
    #[arg(long)]
    pub readonly: bool,
    /// Request queues offered (VIRTIO_BLK_F_MQ), each with its own thread.
    #[arg(long, value_name = "N", default_value_t = default_queues(),
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,
    /// Largest queue size offered to the frontend.
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = parse_queue_size)]
    pub queue_size: u16,
    /// Bypass the host page cache (O_DIRECT). Requests whose buffers are
    /// not aligned for it go through the page cache instead.
    #[arg(long)]
    pub direct: bool,
    /// I/O engine.
    #[arg(long, value_enum, default_value_t = IoEngine::Auto)]
    pub io_engine: IoEngine,
    /// After the last request or completion, how long (µs) a queue thread
    /// keeps watching its ring and its engine before sleeping. Saves a kick
    /// and a wake-up per request when the guest keeps the disk busy; 0
    /// turns polling off.
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub poll_us: u64,
    /// Threads per queue for the thread-pool engine, and for the large
    /// reads of --pool-reads-from.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub pool_threads: u16,
    /// Without --direct, reads of at least this many bytes, when more than
    /// one is wanted at a time, are copied out of the host page cache by
    /// the thread pool, several at once on different CPUs, instead of one
    /// after another on the queue's io_uring. 0 keeps every read on
    /// io_uring.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    pub pool_reads_from: u64,
    /// With --direct, transfers of at least this many bytes go through
    /// huge-page buffers of the backend's own, so that the disk gets one
    /// segment per transfer instead of one per 4 KiB guest page. `auto`:
    /// from 16384 bytes on a virtio disk without indirect descriptors
    /// (where each segment takes a slot of its ring), else off; `off` or 0:
    /// never.
    #[arg(long, value_name = "auto|off|BYTES", default_value = "auto",
          value_parser = parse_bounce)]
    pub bounce: Bounce,
    /// Serial number the guest reads (GET_ID), at most 20 bytes.
    #[arg(long, value_name = "STRING", default_value = "")]
    pub serial: String,
    /// Logical block size the guest uses.
    #[arg(long, value_name = "BYTES", default_value_t = 512,
          value_parser = parse_block_size)]
    pub logical_block_size: u32,
    /// How often (ms) the image's size is checked; a change is reported to
    /// the frontend as a config change. 0 turns this off.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub resize_poll_ms: u64,
    /// Sandbox for the backend.
    #[arg(long, value_enum, default_value_t = SandboxMode::Namespace)]
    pub sandbox: SandboxMode,
    /// Seccomp action for a syscall outside the allowlist.
    #[arg(long, value_enum, default_value_t = SeccompAction::Kill)]
    pub seccomp: SeccompAction,
    /// Exit after this many frontends have come and gone (default: serve
    /// forever, taking the next frontend when one disconnects).
    #[arg(long, value_name = "N")]
    pub connections: Option<u64>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

/// When O_DIRECT transfers go through the backend's huge pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bounce {
    /// Decided from the disk that holds the image.
    Auto,
    /// From this many bytes (0: never).
    From(u64),
}

/// What `auto` means where it applies.
pub const BOUNCE_AUTO_FROM: u64 = 16 << 10;

fn parse_bounce(s: &str) -> Result<Bounce, String> {
    match s {
        "auto" => Ok(Bounce::Auto),
        "off" => Ok(Bounce::From(0)),
        n => n
            .parse()
            .map(Bounce::From)
            .map_err(|_| format!("'{n}' is not auto, off or a number of bytes")),
    }
}

fn default_queues() -> u16 {
    std::thread::available_parallelism()
        .map(|n| n.get().min(8) as u16)
        .unwrap_or(1)
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|e| format!("{e}"))?;
    if !(2..=32768).contains(&n) || !n.is_power_of_two() {
        return Err("a queue size is a power of two from 2 to 32768".into());
    }
    Ok(n)
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("the logical block size is 512 or 4096".into()),
    }
}

/// Errors in a command line that clap accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Socket(#[from] backend_common::SetupError),
    #[error("--serial is {0} bytes; virtio-blk serials are at most 20")]
    SerialTooLong(usize),
}

/// The checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub socket: SocketSource,
    pub image: PathBuf,
    pub readonly: bool,
    pub num_queues: usize,
    pub queue_size: usize,
    pub direct: bool,
    pub io_engine: IoEngine,
    pub pool_threads: usize,
    pub pool_reads_from: u64,
    pub bounce: Bounce,
    pub poll: std::time::Duration,
    pub serial: Vec<u8>,
    pub logical_block_size: u32,
    pub resize_poll_ms: u64,
    pub sandbox: SandboxMode,
    pub seccomp: SeccompAction,
    pub connections: Option<u64>,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, ConfigError> {
        let socket = SocketSource::from_flags(a.socket_path, a.fd)?;
        if a.serial.len() > 20 {
            return Err(ConfigError::SerialTooLong(a.serial.len()));
        }
        Ok(Config {
            socket,
            image: a.image,
            readonly: a.readonly,
            num_queues: usize::from(a.num_queues),
            queue_size: usize::from(a.queue_size),
            direct: a.direct,
            io_engine: a.io_engine,
            pool_threads: usize::from(a.pool_threads),
            pool_reads_from: a.pool_reads_from,
            bounce: a.bounce,
            poll: std::time::Duration::from_micros(a.poll_us),
            serial: a.serial.into_bytes(),
            logical_block_size: a.logical_block_size,
            resize_poll_ms: a.resize_poll_ms,
            sandbox: a.sandbox,
            seccomp: a.seccomp,
            connections: a.connections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let a = Args::try_parse_from(std::iter::once("blk-backend").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Config::try_from(a).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = parse(&["--socket-path", "/tmp/s", "--image", "/tmp/i"]).unwrap();
        assert_eq!(c.queue_size, 1024);
        assert_eq!(c.logical_block_size, 512);
        assert_eq!(c.io_engine, IoEngine::Auto);
        assert!(!c.readonly && !c.direct);
        assert_eq!(c.sandbox, SandboxMode::Namespace);
        assert_eq!(c.bounce, Bounce::Auto);
        let c = parse(&["--socket-path", "/s", "--image", "/i", "--bounce", "off"]).unwrap();
        assert_eq!(c.bounce, Bounce::From(0));
        let c = parse(&["--socket-path", "/s", "--image", "/i", "--bounce", "65536"]).unwrap();
        assert_eq!(c.bounce, Bounce::From(65536));
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let base = ["--socket-path", "/tmp/s", "--image", "/tmp/i"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v)
        };
        assert!(with(&["--logical-block-size", "1024"])
            .unwrap_err()
            .contains("512 or 4096"));
        assert!(with(&["--queue-size", "100"])
            .unwrap_err()
            .contains("power of two"));
        assert!(with(&["--serial", "012345678901234567890"])
            .unwrap_err()
            .contains("at most 20"));
        assert!(with(&["--num-queues", "0"]).is_err());
        assert!(with(&["--bounce", "big"])
            .unwrap_err()
            .contains("auto, off or a number"));
        assert!(parse(&["--image", "/tmp/i"]).is_err());
        assert!(parse(&["--socket-path", "/s", "--fd", "3", "--image", "/i"]).is_err());
    }
}
