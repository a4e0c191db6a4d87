//! QEMU as the compatibility VMM: boots Debian's kernel with the project's busybox initramfs,
//! with vhost-user devices served by our backends, runs a shell script in the guest and returns
//! its exit code and console output (optionally streaming it). The test bed and `orchestrator
//! run` both go through here.
//!
//! The guest side of the protocol lives in [`crate::image`]: `/init` runs `/test.sh` between a
//! start and an exit marker line on the serial console, then powers off.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::find_program;
use crate::image::{self, ImageConfig, ImageError};

/// How a guest script runs a program added with [`Qemu::tool`]:
/// `$TOOL_RUN/tools/NAME ARGS`, as a prefix.
pub const TOOL_RUN: &str = "/tools/ld-linux-x86-64.so.2 --library-path /tools";

/// How many console lines an error quotes.
const TAIL_LINES: usize = 40;
/// How long QEMU may take to exit after the guest printed its exit marker.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);

/// Everything that can go wrong while running a guest.
#[derive(Debug, Error)]
pub enum GuestError {
    /// The guest image could not be built.
    #[error("cannot build the guest image")]
    Image(#[from] ImageError),
    /// A scratch file or directory could not be created.
    #[error("cannot prepare {what}")]
    Scratch {
        /// What was being prepared.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The guest did not finish in time; QEMU was killed.
    #[error("guest did not finish within {timeout:?}\n{tail}")]
    Timeout {
        /// The limit.
        timeout: Duration,
        /// The end of the console and QEMU's stderr.
        tail: String,
    },
    /// QEMU exited before the guest printed its exit marker.
    #[error("{vmm} exited ({status}) before the guest reported an exit code\n{tail}")]
    Exited {
        /// The VMM: QEMU or vmm-core.
        vmm: String,
        /// QEMU's exit status.
        status: String,
        /// The end of the console and QEMU's stderr.
        tail: String,
    },
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: slow but works everywhere.
    Tcg,
    /// Hardware virtualization.
    Kvm,
}

impl Accel {
    /// KVM only where the CPU has VT-x/AMD-V: on a PVM host `/dev/kvm` exists but QEMU with
    /// KVM hangs booting Linux, so `/dev/kvm` alone is not enough.
    pub fn detect() -> Self {
        if backend_common::hardware_virtualization() && Path::new("/dev/kvm").exists() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }
}

/// The QEMU binary: `$QEMU` if set, else `qemu-system-x86_64` on `PATH`.
pub fn qemu_binary() -> Option<PathBuf> {
    match std::env::var_os("QEMU") {
        Some(q) => Some(PathBuf::from(q)),
        None => find_program("qemu-system-x86_64"),
    }
}

/// The image configuration tests use: the default image, cached in `<workspace>/.cache/guest`.
pub fn default_image_config() -> ImageConfig {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().unwrap_or(manifest);
    ImageConfig::new(workspace.join(".cache/guest"))
}

/// QEMU's option syntax splits on ','; a literal comma in a value is written ",,".
pub fn escape_commas(path: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// Whether a guest can be booted here; `Err` says what is missing and how to get it.
/// Guests of one process boot one at a time: on a small machine,
/// parallel TCG guests starve each other and turn timing checks (such as a
/// coherence window) into noise.
fn guest_turn() -> std::sync::MutexGuard<'static, ()> {
    static ONE_GUEST_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that panicked while holding the lock poisoned it; the guest it
    // ran is gone, so the lock is still good.
    ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

pub fn qemu_available() -> Result<(), String> {
    match qemu_binary() {
        Some(q) if q.is_file() => {}
        Some(q) => return Err(format!("QEMU binary {} does not exist", q.display())),
        None => {
            return Err("qemu-system-x86_64 not found (apt-get install qemu-system-x86)".into())
        }
    }
    let cfg = default_image_config();
    image::resolve_kernel(&cfg).map_err(|e| e.to_string())?;
    if !cfg.busybox.is_file() {
        return Err(format!(
            "{} not found (apt-get install busybox-static)",
            cfg.busybox.display()
        ));
    }
    Ok(())
}

/// A QEMU invocation, built up device by device.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
    image: ImageConfig,
    accel: Accel,
    memory_mib: u64,
    hugepages: bool,
    cpus: u32,
    append: Vec<String>,
    devices: Vec<OsString>,
    next_id: usize,
    extra: Vec<image::ExtraFile>,
    stream: bool,
    console: Option<PathBuf>,
    qmp: Option<PathBuf>,
    /// The vhost-user devices, for a VMM other than QEMU.
    vhost: Vec<VhostDevice>,
    /// Boot with this vmm-core binary instead of QEMU.
    vmm_core: Option<PathBuf>,
}

/// A vhost-user device as vmm-core takes it (`--fs/--blk/--net`).
#[derive(Debug, Clone)]
enum VhostDevice {
    Fs {
        socket: PathBuf,
        tag: String,
    },
    Blk {
        socket: PathBuf,
    },
    Net {
        socket: PathBuf,
        mac: String,
        queues: u16,
    },
}

impl Default for Qemu {
    fn default() -> Self {
        Self::new()
    }
}

impl Qemu {
    /// 512 MiB, one vCPU, the accelerator [`Accel::detect`] picks, the default image.
    pub fn new() -> Self {
        Self {
            binary: qemu_binary().unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
            image: default_image_config(),
            accel: Accel::detect(),
            memory_mib: 512,
            hugepages: false,
            cpus: 1,
            append: Vec::new(),
            devices: Vec::new(),
            next_id: 0,
            extra: Vec::new(),
            stream: false,
            console: None,
            qmp: None,
            vhost: Vec::new(),
            vmm_core: None,
        }
    }

    /// Boot with vmm-core (the binary at `path`) instead of QEMU: the same
    /// kernel, initramfs, command line and vhost-user devices, as
    /// virtio-mmio devices the guest finds in the ACPI tables. QEMU's own
    /// devices (user-mode network, QMP) have no counterpart there.
    pub fn vmm_core(mut self, path: &Path) -> Self {
        self.binary = path.to_path_buf();
        self.vmm_core = Some(path.to_path_buf());
        self
    }

    /// Put the guest's serial console on a Unix socket QEMU listens on
    /// (`orchestrator console` connects to it), and keep what it prints in
    /// `PATH.log`; without this it is QEMU's stdio.
    pub fn console_socket(mut self, path: &Path) -> Self {
        self.console = Some(path.to_path_buf());
        self
    }

    /// Serve QMP, QEMU's control protocol, on a Unix socket (what
    /// `orchestrator status` asks for the VMM's own state).
    pub fn qmp(mut self, path: &Path) -> Self {
        self.qmp = Some(path.to_path_buf());
        self
    }

    /// Start the guest as it is configured (no script; its console where
    /// [`Qemu::console_socket`] put it) and return QEMU's process, which
    /// dies with the thread that started it.
    pub fn spawn(&self) -> Result<std::process::Child, GuestError> {
        let img = image::build(&self.image)?;
        let mut cmd = self.command(&img.kernel, &img.initramfs);
        cmd.stdin(Stdio::null());
        // SAFETY: only prctl and sigprocmask, async-signal-safe, between
        // fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                crate::unblock_signals_in_child()
            });
        }
        cmd.spawn().map_err(|source| GuestError::Spawn {
            program: self.binary.display().to_string(),
            source,
        })
    }

    /// Print the script's output on stdout as the guest prints it (for
    /// `orchestrator run -- CMD`), besides collecting it.
    pub fn stream(mut self, on: bool) -> Self {
        self.stream = on;
        self
    }

    /// Boot the guest with an interactive shell on the terminal (no script)
    /// and wait until it powers off. Returns QEMU's exit status.
    pub fn interactive(&self) -> Result<ExitStatus, GuestError> {
        let img = image::build(&self.image)?;
        let mut cmd = self.command(&img.kernel, &img.initramfs);
        cmd.stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().map_err(|source| GuestError::Spawn {
            program: self.binary.display().to_string(),
            source,
        })?;
        child.wait().map_err(|source| GuestError::Spawn {
            program: self.binary.display().to_string(),
            source,
        })
    }

    /// Put a host program and the shared libraries it loads (per `ldd`)
    /// into the guest's `/tools`. Run it there as
    /// `/tools/ld-linux-x86-64.so.2 --library-path /tools /tools/NAME`
    /// ([`TOOL_RUN`] holds that prefix).
    pub fn tool(mut self, program: &Path) -> Result<Self, GuestError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| GuestError::Scratch {
                what: "a guest tool",
                source,
            })
        };
        if self.extra.is_empty() {
            self.extra.push(image::ExtraFile {
                path: "tools".into(),
                mode: 0o755,
                data: Vec::new(),
                dir: true,
            });
        }
        let mut files = vec![program.to_path_buf()];
        let ldd = Command::new("ldd")
            .arg(program)
            .output()
            .map_err(|source| GuestError::Scratch {
                what: "ldd for a guest tool",
                source,
            })?;
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
                files.push(PathBuf::from(p));
            }
        }
        for f in files {
            let Some(name) = f.file_name() else { continue };
            let path = format!("tools/{}", name.to_string_lossy());
            if self.extra.iter().any(|e| e.path == path) {
                continue;
            }
            self.extra.push(image::ExtraFile {
                path,
                mode: 0o755,
                data: read(&f)?,
                dir: false,
            });
        }
        Ok(self)
    }

    /// Put a file (or directory) into the guest's initramfs, beside
    /// `/test.sh`; directories must come before what they hold.
    pub fn extra_file(mut self, f: image::ExtraFile) -> Self {
        self.extra.push(f);
        self
    }

    /// Guest memory size in MiB.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Guest memory in 2 MiB huge pages (hugetlbfs), for either VMM.
    pub fn hugepages(mut self, on: bool) -> Self {
        self.hugepages = on;
        self
    }

    /// Number of vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Overrides the accelerator.
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// The guest image configuration this invocation boots.
    pub fn image_config(&self) -> &ImageConfig {
        &self.image
    }

    /// Uses another guest image configuration.
    pub fn image(mut self, cfg: ImageConfig) -> Self {
        self.image = cfg;
        self
    }

    /// A vhost-user-fs device served at `socket`, visible in the guest as `tag`.
    pub fn fs(mut self, socket: &Path, tag: &str) -> Self {
        self.vhost.push(VhostDevice::Fs {
            socket: socket.to_path_buf(),
            tag: tag.to_string(),
        });
        let chardev = self.chardev(socket);
        self.device(
            "-device",
            format!("vhost-user-fs-pci,chardev={chardev},tag={tag},queue-size=1024"),
        );
        self
    }

    /// A vhost-user-blk disk served at `socket`.
    pub fn blk(mut self, socket: &Path) -> Self {
        self.vhost.push(VhostDevice::Blk {
            socket: socket.to_path_buf(),
        });
        let chardev = self.chardev(socket);
        self.device("-device", format!("vhost-user-blk-pci,chardev={chardev}"));
        self
    }

    /// A vhost-user-blk disk served at `socket`, which QEMU reconnects to
    /// (once a second) when its backend restarts.
    pub fn blk_reconnecting(mut self, socket: &Path) -> Self {
        self.vhost.push(VhostDevice::Blk {
            socket: socket.to_path_buf(),
        });
        let chardev = self.chardev(socket);
        if let Some(spec) = self.devices.last_mut() {
            spec.push(",reconnect=1");
        }
        self.device("-device", format!("vhost-user-blk-pci,chardev={chardev}"));
        self
    }

    /// A vhost-user-net NIC served at `socket`.
    pub fn net(self, socket: &Path) -> Self {
        self.net_with_mac(socket, "52:54:00:12:34:56")
    }

    /// A vhost-user-net NIC served at `socket`, with MAC address `mac`.
    pub fn net_with_mac(self, socket: &Path, mac: &str) -> Self {
        self.net_queues(socket, mac, 1)
    }

    /// A vhost-user-net NIC served at `socket`, with MAC address `mac` and
    /// `pairs` queue pairs (the guest uses as many as it has vCPUs).
    pub fn net_queues(self, socket: &Path, mac: &str, pairs: u16) -> Self {
        self.net_nic(socket, mac, pairs, false)
    }

    /// [`Qemu::net_queues`], reconnecting (once a second) when the backend
    /// restarts; the guest sees the link go down and up.
    pub fn net_reconnecting(self, socket: &Path, mac: &str, pairs: u16) -> Self {
        self.net_nic(socket, mac, pairs, true)
    }

    /// Give the NIC added last this MTU (QEMU offers VIRTIO_NET_F_MTU with
    /// it; without, the guest starts at 1500).
    pub fn nic_mtu(mut self, mtu: u16) -> Self {
        if let Some(spec) = self
            .devices
            .iter_mut()
            .rev()
            .find(|d| d.to_string_lossy().starts_with("virtio-net-pci,"))
        {
            spec.push(format!(",host_mtu={mtu}"));
        }
        self
    }

    fn net_nic(mut self, socket: &Path, mac: &str, pairs: u16, reconnect: bool) -> Self {
        self.vhost.push(VhostDevice::Net {
            socket: socket.to_path_buf(),
            mac: mac.to_string(),
            queues: pairs,
        });
        let chardev = self.chardev(socket);
        if reconnect {
            if let Some(spec) = self.devices.last_mut() {
                spec.push(",reconnect=1");
            }
        }
        let id = self.id("n");
        let (queues, mq) = if pairs > 1 {
            (format!(",queues={pairs}"), ",mq=on")
        } else {
            (String::new(), "")
        };
        self.device(
            "-netdev",
            format!("vhost-user,id={id},chardev={chardev}{queues}"),
        );
        // QEMU 7.2 under TCG crashes in vhost_net_start while setting up
        // MSI-X vector notifiers (a NULL dereference in
        // msix_set_vector_notifiers); legacy interrupts avoid that path.
        let vectors = if self.accel == Accel::Tcg {
            ",vectors=0"
        } else {
            ""
        };
        self.device(
            "-device",
            format!("virtio-net-pci,netdev={id},mac={mac},romfile={vectors}{mq}"),
        );
        self
    }

    /// A NIC on QEMU's user-mode network (10.0.2.15/24, gateway 10.0.2.2), configured by the
    /// guest's init.
    pub fn user_net(mut self) -> Self {
        let id = self.id("n");
        self.device("-netdev", format!("user,id={id}"));
        self.nic(&id);
        self.kernel_arg("testbed.ip=10.0.2.15/24,10.0.2.2")
            .kernel_arg("testbed.dns=10.0.2.3")
    }

    /// Appends to the kernel command line (e.g. `testbed.fs=TAG:PATH`).
    pub fn kernel_arg(mut self, arg: impl Into<String>) -> Self {
        self.append.push(arg.into());
        self
    }

    /// Appends a raw QEMU argument.
    pub fn extra_arg(mut self, arg: impl Into<OsString>) -> Self {
        self.devices.push(arg.into());
        self
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{}", self.next_id)
    }

    fn chardev(&mut self, socket: &Path) -> String {
        let id = self.id("c");
        let mut spec = OsString::from(format!("socket,id={id},path="));
        spec.push(escape_commas(socket));
        self.devices.push("-chardev".into());
        self.devices.push(spec);
        id
    }

    fn device(&mut self, flag: &str, spec: String) {
        self.devices.push(flag.into());
        self.devices.push(spec.into());
    }

    fn nic(&mut self, netdev: &str) {
        // No option ROM: the guest boots with -kernel, and the ROM files are a separate package.
        self.device(
            "-device",
            format!("virtio-net-pci,netdev={netdev},romfile="),
        );
    }

    /// The full QEMU command line for the given kernel and initrd.
    pub fn command(&self, kernel: &Path, initrd: &Path) -> Command {
        if let Some(vmm) = &self.vmm_core {
            return self.vmm_core_command(vmm, kernel, initrd);
        }
        let mem = format!("{}M", self.memory_mib);
        let mut cmd = Command::new(&self.binary);
        cmd.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-monitor", "none"])
        .args(["-m", &mem, "-smp", &self.cpus.to_string()])
        // Backends map guest memory through the fds QEMU sends them: it must be shared.
        .args([
            "-object",
            &format!(
                "memory-backend-memfd,id=mem,size={mem},share=on{}",
                if self.hugepages {
                    ",hugetlb=on,hugetlbsize=2M"
                } else {
                    ""
                }
            ),
        ])
        .args(["-machine", "q35,memory-backend=mem"]);
        match self.accel {
            Accel::Tcg => cmd.args(["-accel", "tcg"]),
            Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        };
        let mut append = vec![
            "console=ttyS0".to_owned(),
            "panic=-1".into(),
            "quiet".into(),
        ];
        append.extend(self.append.iter().cloned());
        cmd.arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(append.join(" "));
        match &self.console {
            Some(path) => {
                let mut spec = OsString::from("socket,id=console,server=on,wait=off,path=");
                spec.push(escape_commas(path));
                spec.push(",logfile=");
                let mut log = path.as_os_str().to_owned();
                log.push(".log");
                spec.push(escape_commas(Path::new(&log)));
                cmd.arg("-chardev")
                    .arg(spec)
                    .args(["-serial", "chardev:console"]);
            }
            None => {
                cmd.args(["-serial", "stdio"]);
            }
        }
        if let Some(path) = &self.qmp {
            let mut spec = OsString::from("unix:");
            spec.push(escape_commas(path));
            spec.push(",server=on,wait=off");
            cmd.arg("-qmp").arg(spec);
        }
        cmd.args(&self.devices);
        cmd
    }

    /// The same VM as a vmm-core command line (see [`Qemu::vmm_core`]).
    fn vmm_core_command(&self, vmm: &Path, kernel: &Path, initrd: &Path) -> Command {
        let mut cmd = Command::new(vmm);
        // reboot=k: the guest's reset and power-off end vmm-core (i8042).
        let mut append = vec![
            "console=ttyS0".to_owned(),
            "panic=-1".into(),
            "reboot=k".into(),
            "quiet".into(),
        ];
        append.extend(self.append.iter().cloned());
        cmd.arg("--kernel")
            .arg(kernel)
            .arg("--initramfs")
            .arg(initrd)
            .arg(format!("--cmdline={}", append.join(" ")))
            .arg(format!("--cpus={}", self.cpus))
            .arg(format!("--memory={}M", self.memory_mib));
        if self.hugepages {
            cmd.arg("--hugepages");
        }
        match &self.console {
            Some(path) => cmd.arg(format!("--serial=socket:{}", path.display())),
            None => cmd.arg("--serial=stdio"),
        };
        // Where QEMU would serve QMP, vmm-core serves its control API
        // (`api.sock` beside it; see `qmp::vmm_state`).
        if let Some(q) = &self.qmp {
            cmd.arg(format!(
                "--api-socket={}",
                q.with_file_name("api.sock").display()
            ));
        }
        for d in &self.vhost {
            match d {
                VhostDevice::Fs { socket, tag } => {
                    cmd.arg(format!("--fs=socket={},tag={tag}", socket.display()))
                }
                VhostDevice::Blk { socket } => {
                    cmd.arg(format!("--blk=socket={}", socket.display()))
                }
                VhostDevice::Net {
                    socket,
                    mac,
                    queues,
                } => cmd.arg(format!(
                    "--net=socket={},mac={mac},queues={}",
                    socket.display(),
                    2 * queues
                )),
            };
        }
        cmd
    }

    /// Boots the guest, runs `script` as `/test.sh` and returns once the guest reports its
    /// exit code, or fails after `timeout` (QEMU is killed then). Guests of
    /// one process boot one at a time (see [`Qemu::run_together`]).
    pub fn run(&self, script: &str, timeout: Duration) -> Result<GuestRun, GuestError> {
        let _turn = guest_turn();
        self.run_now(script, timeout)
    }

    /// Boots several guests at once (each with its script), for work that
    /// needs them side by side, such as two VMs on one link; returns their
    /// runs in order.
    pub fn run_together(
        guests: Vec<(Qemu, String)>,
        timeout: Duration,
    ) -> Vec<Result<GuestRun, GuestError>> {
        let _turn = guest_turn();
        std::thread::scope(|s| {
            let runs: Vec<_> = guests
                .iter()
                .map(|(q, script)| s.spawn(move || q.run_now(script, timeout)))
                .collect();
            runs.into_iter()
                .map(|r| r.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    fn run_now(&self, script: &str, timeout: Duration) -> Result<GuestRun, GuestError> {
        let start = Instant::now();
        let img = image::build(&self.image)?;
        let dir = tempfile::tempdir().map_err(|source| GuestError::Scratch {
            what: "a scratch directory",
            source,
        })?;
        let initrd = dir.path().join("initrd");
        img.write_initrd_with(script, &self.extra, &initrd)?;

        let mut cmd = self.command(&img.kernel, &initrd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_err = |source| GuestError::Spawn {
            program: self.binary.display().to_string(),
            source,
        };
        // SAFETY: the hook runs between fork and exec and only calls prctl
        // and sigprocmask, which are async-signal-safe: QEMU dies with the thread that started
        // it, so an aborted test or a killed `testbed` leaves no guest behind.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                crate::unblock_signals_in_child()
            });
        }
        let mut qemu = cmd.spawn().map_err(spawn_err)?;
        let stdout = qemu.stdout.take();
        let stderr = qemu.stderr.take();
        let mut qemu = QemuChild(qemu);

        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).split(b'\n') {
                    let Ok(line) = line else { break };
                    let line = String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_owned();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut stderr) = stderr {
                let _ = stderr.read_to_string(&mut text);
            }
            text
        });

        let mut serial = Vec::new();
        let deadline = start + timeout;
        let mut in_script = false;
        let exit_code = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    let code = parse_exit_marker(&line);
                    if self.stream {
                        if line.trim() == image::START_MARKER {
                            in_script = true;
                        } else if in_script {
                            // The last line may end without a newline,
                            // right before the marker.
                            let text = match line.find(image::EXIT_MARKER) {
                                Some(at) => &line[..at],
                                None => &line,
                            };
                            if code.is_none() || !text.is_empty() {
                                println!("{text}");
                            }
                        }
                    }
                    serial.push(line);
                    if let Some(code) = code {
                        break code;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    qemu.kill();
                    let tail = tail(&serial, &stderr.join().unwrap_or_default());
                    return Err(GuestError::Timeout { timeout, tail });
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = qemu
                        .wait()
                        .map_or_else(|e| e.to_string(), |s| s.to_string());
                    let tail = tail(&serial, &stderr.join().unwrap_or_default());
                    let vmm = if self.vmm_core.is_some() {
                        "vmm-core"
                    } else {
                        "QEMU"
                    };
                    return Err(GuestError::Exited {
                        vmm: vmm.into(),
                        status,
                        tail,
                    });
                }
            }
        };

        // The guest powers off right after the marker; collect what it prints until QEMU exits,
        // and kill it if the poweroff hangs: the result is already known.
        let grace = Instant::now() + POWEROFF_GRACE;
        while let Ok(line) = lines.recv_timeout(grace.saturating_duration_since(Instant::now())) {
            serial.push(line);
        }
        qemu.kill();
        Ok(GuestRun {
            exit_code,
            serial: serial.join("\n"),
            elapsed: start.elapsed(),
        })
    }
}

/// QEMU, killed and reaped when dropped (also on early returns and panics).
struct QemuChild(std::process::Child);

impl QemuChild {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.0.wait()
    }
}

impl Drop for QemuChild {
    fn drop(&mut self) {
        self.kill();
    }
}

fn parse_exit_marker(line: &str) -> Option<i32> {
    let rest = &line[line.find(image::EXIT_MARKER)? + image::EXIT_MARKER.len()..];
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

fn tail(serial: &[String], stderr: &str) -> String {
    let from = serial.len().saturating_sub(TAIL_LINES);
    format!(
        "--- last {} console lines ---\n{}\n--- QEMU stderr ---\n{}",
        serial.len() - from,
        serial[from..].join("\n"),
        stderr.trim_end()
    )
}

/// The outcome of [`Qemu::run`].
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// The exit code of `/test.sh`.
    pub exit_code: i32,
    /// Everything the guest printed on its console, kernel messages included.
    pub serial: String,
    /// From the start of the run (image check included) to the exit marker and poweroff.
    pub elapsed: Duration,
}

impl GuestRun {
    /// The lines printed while `/test.sh` ran (console lines between the markers).
    pub fn script_lines(&self) -> Vec<&str> {
        self.serial
            .lines()
            .skip_while(|l| l.trim() != image::START_MARKER)
            .skip(1)
            .scan(false, |done, l| {
                if *done {
                    return None;
                }
                // The marker ends the script's output; text before it on
                // its line is the script's last line without a newline.
                Some(match l.find(image::EXIT_MARKER) {
                    Some(at) => {
                        *done = true;
                        (at > 0).then(|| &l[..at])
                    }
                    None => Some(l),
                })
            })
            .flatten()
            .collect()
    }

    /// [`Self::script_lines`] joined with newlines.
    pub fn script_output(&self) -> String {
        self.script_lines().join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_marker_is_found_inside_noise() {
        assert_eq!(parse_exit_marker("TESTBED-EXIT=0"), Some(0));
        assert_eq!(parse_exit_marker("[ 1.0] x TESTBED-EXIT=127\r"), Some(127));
        assert_eq!(parse_exit_marker("TESTBED-EXIT="), None);
        assert_eq!(parse_exit_marker("hello"), None);
    }

    #[test]
    fn script_lines_are_between_the_markers() {
        let run = GuestRun {
            exit_code: 0,
            serial: "boot\nTESTBED-START\na\nb\nTESTBED-EXIT=0\n[ 3.2] reboot".into(),
            elapsed: Duration::ZERO,
        };
        assert_eq!(run.script_lines(), ["a", "b"]);
        let run = GuestRun {
            serial: "TESTBED-START\na\nlastTESTBED-EXIT=0\nx".into(),
            ..run
        };
        assert_eq!(run.script_lines(), ["a", "last"]);
    }

    #[test]
    fn vmm_core_gets_the_same_vm_as_its_own_flags() {
        let q = Qemu::new()
            .cpus(2)
            .memory_mib(1024)
            .fs(Path::new("/run/fs0.sock"), "host")
            .blk_reconnecting(Path::new("/run/blk0.sock"))
            .net_reconnecting(Path::new("/run/net0.sock"), "52:54:00:00:00:01", 2)
            .kernel_arg("testbed.fs=host:/mnt/host")
            .vmm_core(Path::new("/usr/bin/vmm-core"));
        let cmd = q.command(Path::new("/k"), Path::new("/i"));
        assert_eq!(cmd.get_program(), "/usr/bin/vmm-core");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        for want in [
            "--kernel",
            "/k",
            "--initramfs",
            "/i",
            "--cpus=2",
            "--memory=1024M",
            "--serial=stdio",
            "--fs=socket=/run/fs0.sock,tag=host",
            "--blk=socket=/run/blk0.sock",
            "--net=socket=/run/net0.sock,mac=52:54:00:00:00:01,queues=4",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} missing: {args:?}");
        }
        let cmdline = args.iter().find(|a| a.starts_with("--cmdline=")).unwrap();
        assert!(cmdline.contains("reboot=k") && cmdline.contains("testbed.fs=host:/mnt/host"));
        assert!(!args.iter().any(|a| a == "--hugepages"));
        assert!(!args
            .iter()
            .any(|a| a.starts_with('-') && a.contains("accel")));
    }

    #[test]
    fn command_line_shares_memory_and_numbers_devices() {
        let q = Qemu::new()
            .accel(Accel::Tcg)
            .fs(Path::new("/tmp/fs.sock"), "share")
            .blk(Path::new("/tmp/b,lk.sock"))
            .user_net();
        let cmd = q.command(Path::new("/k"), Path::new("/i"));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(joined.contains("-accel tcg"));
        assert!(joined.contains("socket,id=c1,path=/tmp/fs.sock"));
        assert!(joined.contains("vhost-user-fs-pci,chardev=c1,tag=share,queue-size=1024"));
        assert!(joined.contains("socket,id=c2,path=/tmp/b,,lk.sock"));
        assert!(joined.contains("vhost-user-blk-pci,chardev=c2"));
        assert!(joined.contains("-netdev user,id=n3"));
        assert!(joined.contains("testbed.ip=10.0.2.15/24,10.0.2.2"));
        let huge = q.hugepages(true).command(Path::new("/k"), Path::new("/i"));
        let joined: Vec<String> = huge
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(joined
            .iter()
            .any(|a| a.ends_with("share=on,hugetlb=on,hugetlbsize=2M")));
    }
}
