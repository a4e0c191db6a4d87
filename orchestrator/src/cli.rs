//! Command-line interface of the `orchestrator` binary.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use orchestrator::image::{self, ImageConfig};

/// Starts, wires and supervises the device processes and the VMM.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM and run a command in it (or get a console). Without -f:
    /// the current directory shared at /mnt/host, a scratch disk and a
    /// network interface, on the default guest image.
    Run(RunArgs),
    /// Boot a VM and keep it running: with -d in the background (its
    /// console on a socket: `orchestrator console`), else with its console
    /// here. `orchestrator down` stops it.
    Up(UpArgs),
    /// Connect this terminal to the serial console of a VM started with
    /// `up -d` (Ctrl-] detaches).
    Console(NameArgs),
    /// Print each device's process, state and restarts, and the VMM's own
    /// state.
    Status(NameArgs),
    /// Print a device's log (its stdout and stderr).
    Logs(LogsArgs),
    /// Print the command line the orchestrator runs a device with, to run
    /// it by hand.
    ShowCmd(ShowCmdArgs),
    /// Stop a running VM: its orchestrator shuts the backends and the VMM
    /// down.
    Down(NameArgs),
    /// Restart one backend of a running VM.
    Restart(DeviceArgs),
    /// Take one backend out of supervision and run it here, in the
    /// foreground, on the same socket, with debug logging; the VM
    /// reconnects to it. When it exits, it goes back under supervision.
    Attach(AttachArgs),
    /// Write systemd units for a VM: a socket and a service per backend, a
    /// service for the VMM, and a target grouping them.
    Units(UnitsArgs),
    /// Relay a VMM's vhost-user connection to a share's backend, so the
    /// VMM keeps the device when the backend restarts (QEMU 7.2 cannot
    /// reconnect vhost-user-fs). `up` and `run` do this themselves; the
    /// systemd units run it as a service.
    Relay(RelayArgs),
    /// The default guest image.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Args)]
pub struct UnitsArgs {
    /// Write systemd units here (e.g. /etc/systemd/system).
    #[arg(long, value_name = "DIR", required_unless_present = "launchd")]
    pub systemd: Option<PathBuf>,
    /// Write launchd property lists here (e.g. ~/Library/LaunchAgents).
    #[arg(long, value_name = "DIR")]
    pub launchd: Option<PathBuf>,
    /// The VM config (TOML). Without it, the default VM.
    #[arg(short = 'f', long = "file", value_name = "VM.TOML")]
    pub file: Option<PathBuf>,
    /// Where the sockets go at run time.
    #[arg(long, value_name = "DIR", default_value = "/run/vmm")]
    pub run_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The VM config (TOML). Without it, the default VM.
    #[arg(short = 'f', long = "file", value_name = "VM.TOML")]
    pub file: Option<PathBuf>,
    /// Also print every backend's log lines, prefixed with the device.
    #[arg(short, long)]
    pub verbose: bool,
    /// Forward a host port (or range) to the guest, e.g. `-p 8080:80`
    /// (TCP, host 8080 to guest 80) or `-p 5353:53/udp`; repeatable. The
    /// VM's first user-mode NIC takes it (the default VM's network is one),
    /// as `tcp_forward` and `udp_forward` do.
    #[arg(short = 'p', long = "publish", value_name = "HOST[:GUEST][/udp]")]
    pub publish: Vec<String>,
    /// Give up on the guest after this many seconds (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub timeout: u64,
    /// The command to run in the guest (from /mnt/host); none: a console.
    /// One word is a shell script (`-- 'make && ./test'`); several are a
    /// command and its arguments, each kept whole (`-- sh -c 'a; b'`).
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// The VM config (TOML). Without it, the default VM.
    #[arg(short = 'f', long = "file", value_name = "VM.TOML")]
    pub file: Option<PathBuf>,
    /// Run in the background; the orchestrator's own log goes to the VM's
    /// state directory.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Also print every backend's log lines, prefixed with the device.
    #[arg(short, long)]
    pub verbose: bool,
    /// Forward a host port (or range) to the guest, e.g. `-p 8080:80`
    /// (TCP, host 8080 to guest 80) or `-p 5353:53/udp`; repeatable. The
    /// VM's first user-mode NIC takes it (the default VM's network is one),
    /// as `tcp_forward` and `udp_forward` do.
    #[arg(short = 'p', long = "publish", value_name = "HOST[:GUEST][/udp]")]
    pub publish: Vec<String>,
    /// The detached orchestrator itself (started by `up -d`).
    #[arg(long, hide = true)]
    pub daemon: bool,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    /// The VM's name ([vm] name in its config; "default" without one).
    #[arg(long, default_value = "default")]
    pub name: String,
}

#[derive(Debug, Args)]
pub struct RelayArgs {
    /// Where the VMM connects (bound here).
    #[arg(long, value_name = "PATH", required_unless_present = "fd")]
    pub listen: Option<std::path::PathBuf>,
    /// An already bound listening socket to take instead (systemd's
    /// socket activation hands it over as fd 3).
    #[arg(long, value_name = "N", conflicts_with = "listen")]
    pub fd: Option<i32>,
    /// The backend's socket.
    #[arg(long, value_name = "PATH")]
    pub backend: std::path::PathBuf,
    /// The device, for log lines.
    #[arg(long, default_value = "fs0")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// fs0, blk0, ... (see `status`).
    pub device: String,
    #[arg(long, default_value = "default")]
    pub name: String,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// fs0, blk0, ... (see `status`).
    pub device: String,
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Run it under gdbserver on this address (e.g. :1234). The backend
    /// waits at its first instruction until a debugger connects
    /// (gdb -ex 'target remote ADDR'); it forks into its sandbox, so to
    /// debug the process that serves, `set follow-fork-mode child` first.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = ":1234")]
    pub gdb: Option<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// fs0, blk0, ... (see `status`).
    pub device: String,
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Keep printing what the device writes.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct ShowCmdArgs {
    /// fs0, blk0, ...
    pub device: String,
    /// The VM config (TOML). Without it, the default VM.
    #[arg(short = 'f', long = "file", value_name = "VM.TOML")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build (or refresh) the default guest image: Debian's cloud kernel + a busybox initramfs.
    Build(BuildArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Output directory [default: <workspace>/.cache/guest]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Kernel image to use instead of the newest /boot/vmlinuz-*-cloud-amd64.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Kernel version (selects /boot/vmlinuz-VER and /lib/modules/VER).
    #[arg(long, value_name = "VER")]
    pub kernel_version: Option<String>,
    /// Statically linked busybox to pack.
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/busybox")]
    pub busybox: PathBuf,
}

impl From<BuildArgs> for ImageConfig {
    fn from(args: BuildArgs) -> Self {
        let mut cfg = ImageConfig::new(args.out.unwrap_or_else(image::default_out_dir));
        cfg.kernel = args.kernel;
        cfg.kernel_version = args.kernel_version;
        cfg.busybox = args.busybox;
        cfg
    }
}
