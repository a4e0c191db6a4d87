//! Command line, compatible with virtiofsd where the concept is the same, so
//! existing QEMU, libvirt and Kata set-ups drop in.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use backend_common::SocketSource;

/// How the guest may cache what it learns from the share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CacheMode {
    /// No caching: every access asks the host. Always coherent, slowest.
    Never,
    /// Metadata cached for the coherence window, file data never.
    Metadata,
    /// Close-to-open: metadata cached for the coherence window, file data
    /// kept until an open sees the file changed (virtiofsd's default).
    Auto,
    /// Cache everything for a day: fastest, and host changes may never show
    /// (as virtiofsd --cache=always). For shares only the guest writes.
    Always,
    /// Our default: cache metadata and data for the coherence window, and
    /// drop cached data as soon as the guest sees a changed mtime or size.
    /// Host changes show within --coherence-ms.
    Coherent,
}

/// Sandboxing of the daemon process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SandboxMode {
    /// New mount, pid and net namespaces, pivot_root into the share.
    Namespace,
    /// chroot into the share.
    Chroot,
    /// Nothing: the process sees the host as its user does.
    None,
}

/// What seccomp does with a syscall outside the allowlist.
pub use backend_common::seccomp::Action as SeccompAction;

/// Use of file handles to name inodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InodeFileHandles {
    Never,
    Prefer,
    Mandatory,
}

/// virtiofsd-fast: a vhost-user virtio-fs backend.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// vhost-user socket to listen on.
    #[arg(long, value_name = "PATH", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// An already listening vhost-user socket, inherited from a supervisor.
    #[arg(long, value_name = "FD")]
    pub fd: Option<RawFd>,
    /// The directory shared with the guest.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present_any = ["print_capabilities", "compat"]
    )]
    pub shared_dir: Option<PathBuf>,
    /// virtiofsd's compatibility options, as libvirt and Kata pass them
    /// (comma-separated, `,,` for a comma in a value): source=DIR,
    /// cache=none|auto|always|metadata, sandbox=namespace|chroot,
    /// loglevel=debug|info|warn|err, xattr, no_xattr, posix_acl,
    /// no_posix_acl, writeback, no_writeback, announce_submounts,
    /// readdirplus, no_flock, no_posix_lock. Anything else is refused.
    #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
    pub compat: Vec<String>,
    /// Debug logging (as --log-level=debug).
    #[arg(short = 'd')]
    pub debug: bool,
    /// Log to the system log (/dev/log) instead of stderr.
    #[arg(long)]
    pub syslog: bool,
    /// The tag the guest mounts (also in the device's config space).
    #[arg(long, default_value = "share")]
    pub tag: String,
    /// Guest caching policy.
    #[arg(long, value_enum, default_value_t = CacheMode::Coherent)]
    pub cache: CacheMode,
    /// Longest time, in milliseconds, a host change may stay invisible to
    /// the guest in the auto, metadata and coherent modes.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub coherence_ms: u64,
    /// After a request, how long (µs) a queue thread keeps watching its
    /// ring before sleeping until the guest's next kick. Saves a kick and a
    /// wake-up per request when the guest sends them back to back; 0 turns
    /// polling off.
    #[arg(long, value_name = "US", default_value_t = 50)]
    pub poll_us: u64,
    /// Request queues offered to the frontend (besides the high-priority
    /// queue), each served by its own thread. Linux 6.11+ guests spread
    /// requests over as many as the VMM sets up.
    #[arg(long, value_name = "N", default_value_t = default_request_queues(),
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub request_queues: u16,
    /// Threads that serve the request queues' requests (0: each queue's
    /// own thread serves them, the fastest for most guests; a pool keeps
    /// one blocking request, such as a FIFO opened with no writer, from
    /// holding up the rest).
    #[arg(long, default_value_t = 0)]
    pub thread_pool_size: usize,
    /// Sandbox for the daemon.
    #[arg(long, value_enum, default_value_t = SandboxMode::Namespace)]
    pub sandbox: SandboxMode,
    /// Seccomp action for a syscall outside the allowlist (`log` allows it
    /// and leaves an audit record).
    #[arg(long, value_enum, default_value_t = SeccompAction::Kill)]
    pub seccomp: SeccompAction,
    /// Pass extended attributes through.
    #[arg(long)]
    pub xattr: bool,
    /// Support POSIX ACLs (implies --xattr).
    #[arg(long)]
    pub posix_acl: bool,
    /// Let the guest cache writes (FUSE writeback cache).
    #[arg(long)]
    pub writeback: bool,
    /// Tell the guest about filesystems mounted inside the share, so each
    /// shows there as a mount of its own (its own device number, so inode
    /// numbers from different host filesystems cannot collide).
    #[arg(long)]
    pub announce_submounts: bool,
    /// File handles for inodes: `prefer` keeps an O_PATH descriptor per
    /// inode the guest holds up to half the open-file limit, then swaps the
    /// least recently used for file handles; `never` keeps a descriptor per
    /// inode without bound; `mandatory` refuses files that cannot have one.
    #[arg(long, value_enum, default_value_t = InodeFileHandles::Prefer)]
    pub inode_file_handles: InodeFileHandles,
    /// Raise RLIMIT_NOFILE to this (default: the hard limit).
    #[arg(long, value_name = "N")]
    pub rlimit_nofile: Option<u64>,
    /// Print the vhost-user capabilities JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Log filter (error, warn, info, debug, trace, or RUST_LOG syntax).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Serve this many frontend connections, then exit (default: serve
    /// again after every disconnect).
    #[arg(long, value_name = "N")]
    pub connections: Option<u64>,
    /// Keep the guest's session (the node IDs and open files it holds, what
    /// its mount agreed) in this file, outside the share, so that a daemon
    /// started after this one dies serves the same guest: the frontend
    /// reconnects and the guest's mount carries on. Made if missing (mode
    /// 0600); a sparse file of about 264 MiB.
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,
}

/// One request queue per CPU, at most 8: more queues than CPUs only add
/// idle threads.
fn default_request_queues() -> u16 {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8) as u16)
}

/// Errors turning flags into a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error(transparent)]
    Socket(#[from] backend_common::SetupError),
    #[error("--shared-dir is required")]
    NoSharedDir,
    #[error("--shared-dir {0}: not a directory")]
    NotADir(PathBuf),
    #[error("--shared-dir {path}")]
    SharedDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--tag must be 1 to 36 bytes, got {0}")]
    Tag(usize),
    #[error("--{0} is not supported yet; leave it off")]
    Unsupported(&'static str),
    #[error("-o {option}: {why}")]
    Compat { option: String, why: &'static str },
}

/// Split one `-o` argument at its commas; `,,` is a comma inside a value
/// (libvirt's escaping of a path).
fn compat_options(arg: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = arg.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().unwrap().push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().unwrap().push(c);
        }
    }
    out.retain(|o| !o.is_empty());
    out
}

impl Args {
    /// Fold virtiofsd's `-o` options (and `-d`) into the flags they stand
    /// for; once: what is folded is cleared.
    pub fn apply_compat(&mut self) -> Result<(), ArgsError> {
        let bad = |option: &str, why| ArgsError::Compat {
            option: option.to_string(),
            why,
        };
        for option in std::mem::take(&mut self.compat)
            .iter()
            .flat_map(|a| compat_options(a))
        {
            match option.split_once('=') {
                Some(("source", dir)) => self.shared_dir = Some(PathBuf::from(dir)),
                Some(("cache", v)) => {
                    self.cache = match v {
                        "none" | "never" => CacheMode::Never,
                        "auto" => CacheMode::Auto,
                        "always" => CacheMode::Always,
                        "metadata" => CacheMode::Metadata,
                        _ => return Err(bad(&option, "cache is none, auto, always or metadata")),
                    }
                }
                Some(("sandbox", v)) => {
                    self.sandbox = match v {
                        "namespace" => SandboxMode::Namespace,
                        "chroot" => SandboxMode::Chroot,
                        "none" => SandboxMode::None,
                        _ => return Err(bad(&option, "sandbox is namespace, chroot or none")),
                    }
                }
                Some(("loglevel" | "log_level", v)) => {
                    self.log_level = match v {
                        "debug" | "info" | "warn" => v.to_string(),
                        "err" => "error".to_string(),
                        _ => return Err(bad(&option, "loglevel is debug, info, warn or err")),
                    }
                }
                Some(_) => return Err(bad(&option, "not an option virtiofsd-fast knows")),
                None => match option.as_str() {
                    "xattr" => self.xattr = true,
                    "no_xattr" => self.xattr = false,
                    "posix_acl" => self.posix_acl = true,
                    "no_posix_acl" => self.posix_acl = false,
                    "writeback" => self.writeback = true,
                    "no_writeback" => self.writeback = false,
                    "announce_submounts" => self.announce_submounts = true,
                    // What the daemon does anyway.
                    "readdirplus" | "no_flock" | "no_posix_lock" => {}
                    "flock" | "posix_lock" => return Err(bad(
                        &option,
                        "host locks are not served (leave it off, or use no_flock/no_posix_lock)",
                    )),
                    _ => return Err(bad(&option, "not an option virtiofsd-fast knows")),
                },
            }
        }
        if self.debug {
            self.log_level = "debug".into();
        }
        Ok(())
    }
}

/// The daemon's configuration, validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub socket: SocketSource,
    pub shared_dir: PathBuf,
    pub tag: String,
    pub cache: CacheMode,
    pub coherence: Duration,
    pub poll: Duration,
    pub request_queues: usize,
    pub sandbox: SandboxMode,
    pub seccomp: SeccompAction,
    pub xattr: bool,
    pub posix_acl: bool,
    pub writeback: bool,
    pub announce_submounts: bool,
    pub thread_pool_size: usize,
    pub inode_file_handles: InodeFileHandles,
    pub rlimit_nofile: Option<u64>,
    pub connections: Option<u64>,
    pub state_file: Option<PathBuf>,
}

impl TryFrom<Args> for Config {
    type Error = ArgsError;

    fn try_from(mut a: Args) -> Result<Self, ArgsError> {
        a.apply_compat()?;
        let socket = SocketSource::from_flags(a.socket_path, a.fd)?;
        let given = a.shared_dir.ok_or(ArgsError::NoSharedDir)?;
        let shared_dir = std::fs::canonicalize(&given).map_err(|source| ArgsError::SharedDir {
            path: given.clone(),
            source,
        })?;
        if !shared_dir.is_dir() {
            return Err(ArgsError::NotADir(shared_dir));
        }
        if a.tag.is_empty() || a.tag.len() > 36 {
            return Err(ArgsError::Tag(a.tag.len()));
        }
        if a.thread_pool_size > 1024 {
            return Err(ArgsError::Unsupported("thread-pool-size above 1024"));
        }
        Ok(Config {
            socket,
            shared_dir,
            tag: a.tag,
            cache: a.cache,
            coherence: Duration::from_millis(a.coherence_ms),
            poll: Duration::from_micros(a.poll_us),
            request_queues: usize::from(a.request_queues),
            sandbox: a.sandbox,
            seccomp: a.seccomp,
            // ACLs are extended attributes (system.posix_acl_*).
            xattr: a.xattr || a.posix_acl,
            posix_acl: a.posix_acl,
            writeback: a.writeback,
            announce_submounts: a.announce_submounts,
            thread_pool_size: a.thread_pool_size,
            inode_file_handles: a.inode_file_handles,
            rlimit_nofile: a.rlimit_nofile,
            connections: a.connections,
            state_file: a.state_file,
        })
    }
}

/// The vhost-user backend capabilities, as `--print-capabilities` prints
/// them (the vhost-user spec's JSON for a backend program): a virtio-fs
/// device, and no optional feature (it does not migrate).
pub fn capabilities_json() -> &'static str {
    "{\n  \"type\": \"fs\",\n  \"features\": []\n}"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, ArgsError> {
        let dir = std::env::temp_dir();
        let mut v = vec!["virtiofsd-fast", "--socket-path=/tmp/x.sock"];
        let d = format!("--shared-dir={}", dir.display());
        v.push(&d);
        v.extend_from_slice(extra);
        Config::try_from(Args::try_parse_from(v).unwrap())
    }

    #[test]
    fn defaults_are_coherent_and_sandboxed() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.sandbox, SandboxMode::Namespace);
        assert_eq!(c.seccomp, SeccompAction::Kill);
        assert_eq!(c.cache, CacheMode::Coherent);
        assert_eq!(c.coherence, Duration::from_secs(1));
    }

    #[test]
    fn virtiofsd_flags_parse() {
        let c = parse(&[
            "--cache=always",
            "--xattr",
            "--sandbox=none",
            "--seccomp=none",
            "--tag=myfs",
        ])
        .unwrap();
        assert_eq!(c.cache, CacheMode::Always);
        assert!(c.xattr);
        assert_eq!(c.tag, "myfs");
        assert!(!c.posix_acl);
        let c = parse(&["--posix-acl"]).unwrap();
        assert!(c.posix_acl && c.xattr, "--posix-acl implies --xattr");
    }

    fn parse_only(argv: &[&str]) -> Result<Config, ArgsError> {
        let mut v = vec!["virtiofsd-fast"];
        v.extend_from_slice(argv);
        Config::try_from(Args::try_parse_from(v).unwrap())
    }

    /// The command line libvirt builds (qemuVirtioFSBuildCommandLine):
    /// --fd, one -o with source (commas doubled), cache, sandbox, xattr and
    /// the lock options, --thread-pool-size, -d.
    #[test]
    fn libvirts_command_line_parses() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("a,b");
        std::fs::create_dir(&odd).unwrap();
        let source = odd.display().to_string().replace(',', ",,");
        let o = format!("source={source},cache=always,sandbox=chroot,xattr,no_flock,no_posix_lock");
        let c = parse_only(&["--fd=3", "-o", &o, "--thread-pool-size=16", "-d"]).unwrap();
        assert_eq!(c.shared_dir, odd.canonicalize().unwrap());
        assert_eq!(
            (c.cache, c.sandbox, c.xattr, c.thread_pool_size),
            (CacheMode::Always, SandboxMode::Chroot, true, 16)
        );
        let c = parse_only(&[
            "--fd=3",
            "-o",
            &format!("source={source},cache=none,no_xattr"),
        ])
        .unwrap();
        assert_eq!((c.cache, c.xattr), (CacheMode::Never, false));
    }

    /// The command lines Kata builds: --syslog, --cache, --shared-dir,
    /// --fd=3 and its extra arguments (new and old style).
    #[test]
    fn katas_command_lines_parse() {
        let dir = std::env::temp_dir();
        let shared = format!("--shared-dir={}", dir.display());
        for extra in [
            &["--thread-pool-size=1", "--announce-submounts"][..],
            &["--thread-pool-size=1", "-o", "announce_submounts"],
        ] {
            let mut argv = vec!["--syslog", "--cache=auto", &shared, "--fd=3"];
            argv.extend_from_slice(extra);
            let a = Args::try_parse_from(std::iter::once("virtiofsd-fast").chain(argv.clone()))
                .unwrap();
            assert!(a.syslog);
            let c = parse_only(&argv).unwrap();
            assert!(
                c.announce_submounts && c.cache == CacheMode::Auto,
                "{argv:?}"
            );
        }
    }

    #[test]
    fn compat_options_that_would_mislead_are_refused() {
        for o in [
            "flock",
            "posix_lock",
            "modcaps=+sys_admin",
            "cache=bogus",
            "frobnicate",
        ] {
            let e =
                parse_only(&["--socket-path=/x", "-o", &format!("source=/tmp,{o}")]).unwrap_err();
            assert!(e.to_string().starts_with(&format!("-o {o}")), "{e}");
        }
        assert!(!capabilities_json().contains("migrate"));
    }

    #[test]
    fn bad_values_are_clear_errors() {
        assert!(matches!(parse(&["--tag="]), Err(ArgsError::Tag(0))));
        let long = format!("--tag={}", "x".repeat(37));
        assert!(matches!(parse(&[&long]), Err(ArgsError::Tag(37))));
        let e = Config::try_from(
            Args::try_parse_from([
                "virtiofsd-fast",
                "--socket-path=/x",
                "--shared-dir=/nonexistent/dir",
            ])
            .unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir"), "{e}");
        assert!(
            Args::try_parse_from(["virtiofsd-fast", "--shared-dir=/tmp", "--cache=bogus"]).is_err()
        );
    }
}
