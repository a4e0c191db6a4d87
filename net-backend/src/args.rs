//! Command line and the checked configuration it becomes.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::Parser;

use backend_common::SocketSource;

/// Sandboxing of the backend process.
pub use backend_common::sandbox::Confinement as SandboxMode;

/// What seccomp does with a syscall outside the allowlist.
pub use backend_common::seccomp::Action as SeccompAction;

/// net-backend: a vhost-user virtio-net backend, one process per NIC.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// vhost-user socket to listen on.
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// An already listening vhost-user socket, inherited from a supervisor.
    #[arg(long, value_name = "FD")]
    pub fd: Option<RawFd>,
    /// Open (or create) the tap device NAME, one queue per queue pair
    /// (needs CAP_NET_ADMIN).
    #[arg(long, value_name = "NAME", group = "link")]
    pub tap: Option<String>,
    /// An already opened tap queue, from a supervisor (no privilege
    /// needed); one per queue pair, repeated or comma-separated.
    #[arg(long, value_name = "FD", group = "link", value_delimiter = ',', num_args = 1..)]
    pub tap_fd: Vec<RawFd>,
    /// Exchange frames (each a 12-byte virtio_net_hdr and an Ethernet
    /// frame) with the process listening on this Unix socket (for instance
    /// another net-backend with --socket-listen). `@NAME` is a name in the
    /// abstract namespace.
    #[arg(long, value_name = "PATH", group = "link")]
    pub socket: Option<PathBuf>,
    /// Listen on this Unix socket and exchange frames with the process
    /// that connects (the newest one, if several): two VMs joined with no
    /// tap and no privilege. `@NAME` is a name in the abstract namespace.
    #[arg(long, value_name = "PATH", group = "link")]
    pub socket_listen: Option<PathBuf>,
    /// The kind of socket --socket and --socket-listen use: one frame per
    /// SOCK_SEQPACKET message, or per SOCK_DGRAM datagram; `stream`
    /// connects (--socket) to a peer that frames them on a SOCK_STREAM
    /// with their length, as passt does (`passt -f -s PATH`), with no
    /// offloads for the guest.
    #[arg(long, value_enum, default_value_t = SocketType::Seqpacket)]
    pub socket_type: SocketType,
    /// The guest's MAC address.
    #[arg(long, default_value = "52:54:00:12:34:56", value_parser = parse_mac)]
    pub mac: [u8; 6],
    /// MTU offered to the guest.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(68..=65535))]
    pub mtu: u16,
    /// Queue pairs, each served by its own thread and tap queue (more than
    /// one needs a tap).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub num_queue_pairs: u16,
    /// Largest queue size offered to the frontend.
    #[arg(long, default_value_t = 1024)]
    pub queue_size: u16,
    /// After sending what the guest queued, watch the transmit ring this
    /// long (microseconds) before sleeping until its next kick: frames sent
    /// back to back then cost no kick and no wake-up. 0 turns it off.
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub poll_us: u64,
    /// How transmitted frames reach a tap: a batch per io_uring submission
    /// (a ring that can only write to the tap), or one writev per frame.
    /// Without io_uring in the kernel, uring falls back to writev.
    #[arg(long, value_enum, default_value_t = TxEngine::Uring)]
    pub tx_engine: TxEngine,
    /// Sandbox for the backend.
    #[arg(long, value_enum, default_value_t = SandboxMode::Namespace)]
    pub sandbox: SandboxMode,
    /// Seccomp action for a syscall outside the allowlist.
    #[arg(long, value_enum, default_value_t = SeccompAction::Kill)]
    pub seccomp: SeccompAction,
    /// Exit after this many frontends have come and gone.
    #[arg(long, value_name = "N")]
    pub connections: Option<u64>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("`{s}` is not a MAC address like 52:54:00:12:34:56");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "`{s}` is a multicast address; a NIC needs a unicast one"
        ));
    }
    Ok(mac)
}

/// Where frames go.
#[derive(Clone, Debug)]
pub enum LinkChoice {
    Tap(String),
    TapFds(Vec<RawFd>),
    Socket(PathBuf, SocketType),
    SocketListen(PathBuf, SocketType),
}

/// The kind of Unix socket a socket link uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketType {
    Seqpacket,
    Dgram,
    /// Frames behind a 4-byte big-endian length, no virtio_net_hdr: QEMU's
    /// `-netdev stream` framing, which passt speaks (--socket only).
    Stream,
}

/// How transmitted frames reach a tap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TxEngine {
    Uring,
    Writev,
}

/// Errors in a command line that clap accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Socket(#[from] backend_common::SetupError),
    #[error("say where frames go: --tap NAME, --tap-fd FD, --socket PATH or --socket-listen PATH")]
    NoLink,
    #[error("--num-queue-pairs {pairs} needs {pairs} tap queues, and {fds} --tap-fd were given")]
    TapFds { pairs: usize, fds: usize },
    #[error(
        "--num-queue-pairs {0} needs a tap (--tap or --tap-fd); a socket link has one queue pair"
    )]
    SocketPairs(usize),
    #[error(
        "--socket-type=stream connects to a peer that listens (--socket PATH, e.g. passt's \
         socket); it cannot listen"
    )]
    StreamListen,
}

/// The checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub socket: SocketSource,
    pub link: LinkChoice,
    pub mac: [u8; 6],
    pub mtu: u16,
    pub queue_pairs: usize,
    pub queue_size: usize,
    pub poll: std::time::Duration,
    pub tx_engine: TxEngine,
    pub sandbox: SandboxMode,
    pub seccomp: SeccompAction,
    pub connections: Option<u64>,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, ConfigError> {
        let socket = SocketSource::from_flags(a.socket_path, a.fd)?;
        let pairs = usize::from(a.num_queue_pairs);
        let link = if let Some(t) = a.tap {
            LinkChoice::Tap(t)
        } else if !a.tap_fd.is_empty() {
            if a.tap_fd.len() != pairs {
                return Err(ConfigError::TapFds {
                    pairs,
                    fds: a.tap_fd.len(),
                });
            }
            LinkChoice::TapFds(a.tap_fd)
        } else if let Some(p) = a.socket {
            LinkChoice::Socket(p, a.socket_type)
        } else if let Some(p) = a.socket_listen {
            if a.socket_type == SocketType::Stream {
                return Err(ConfigError::StreamListen);
            }
            LinkChoice::SocketListen(p, a.socket_type)
        } else {
            return Err(ConfigError::NoLink);
        };
        if pairs > 1 && matches!(link, LinkChoice::Socket(..) | LinkChoice::SocketListen(..)) {
            return Err(ConfigError::SocketPairs(pairs));
        }
        Ok(Config {
            socket,
            link,
            mac: a.mac,
            mtu: a.mtu,
            queue_pairs: pairs,
            queue_size: usize::from(a.queue_size),
            poll: std::time::Duration::from_micros(a.poll_us),
            tx_engine: a.tx_engine,
            sandbox: a.sandbox,
            seccomp: a.seccomp,
            connections: a.connections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:ab:cd:ef").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0xef]
        );
        assert!(parse_mac("52:54:00:ab:cd").is_err());
        assert!(parse_mac("01:00:5e:00:00:01")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_mac("zz:54:00:ab:cd:ef").is_err());
    }

    #[test]
    fn a_link_is_required() {
        let a = Args::try_parse_from(["net-backend", "--socket-path", "/tmp/s"]).unwrap();
        assert!(Config::try_from(a)
            .unwrap_err()
            .to_string()
            .contains("--tap NAME"));
        assert!(Args::try_parse_from([
            "net-backend",
            "--socket-path",
            "/s",
            "--tap",
            "t",
            "--socket",
            "/p"
        ])
        .is_err());
    }

    #[test]
    fn queue_pairs_match_the_links() {
        let parse = |v: &[&str]| {
            let mut argv = vec!["net-backend", "--socket-path", "/s"];
            argv.extend_from_slice(v);
            Config::try_from(Args::try_parse_from(argv).unwrap())
        };
        let c = parse(&["--num-queue-pairs", "2", "--tap-fd", "4,5"]).unwrap();
        assert!(matches!(c.link, LinkChoice::TapFds(ref f) if f == &[4, 5]));
        assert_eq!(c.queue_pairs, 2);
        assert!(parse(&["--num-queue-pairs", "2", "--tap-fd", "4"])
            .unwrap_err()
            .to_string()
            .contains("needs 2 tap queues"));
        assert!(parse(&["--num-queue-pairs", "2", "--socket", "/p"])
            .unwrap_err()
            .to_string()
            .contains("needs a tap"));
        assert!(Args::try_parse_from([
            "net-backend",
            "--socket-path",
            "/s",
            "--tap",
            "t",
            "--num-queue-pairs",
            "17"
        ])
        .is_err());
    }
}
