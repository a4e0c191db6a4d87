//! One VM: its config turned into supervised backends and a VMM.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{BlkDevice, FsDevice, NetDevice, NetLink, VmConfig, VmmChoice};
use crate::qemu::{self, Qemu};
use crate::state::StateDir;
use crate::supervisor::{DeviceSpec, Supervisor};

/// Errors that stop `run`/`up` before or while the VM runs.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Choice(String),
    #[error("{name} not found: build the workspace (`cargo build --release`) or put it on PATH")]
    Missing { name: &'static str },
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Supervise(#[from] crate::supervisor::SuperviseError),
    #[error(transparent)]
    Guest(#[from] qemu::GuestError),
    #[error("opening tap {name}: {source} (creating a tap needs root or CAP_NET_ADMIN)")]
    Tap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "net{0}: user = true needs passt, which is not installed (apt-get install passt), \
         or give the NIC a tap instead"
    )]
    NoPasst(usize),
    #[error("creating the scratch disk {path}: {source}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Which VMM runs the guest, and why.
pub fn choose_vmm(choice: VmmChoice) -> Result<(&'static str, String), VmError> {
    let hw = crate::qemu::Accel::detect() == crate::qemu::Accel::Kvm;
    match choice {
        VmmChoice::Qemu => Ok(("qemu", "vmm = \"qemu\" in the config".into())),
        VmmChoice::Core if hw => Ok(("vmm-core", "vmm = \"core\" in the config".into())),
        VmmChoice::Core => Err(VmError::Choice(
            "vmm = \"core\": vmm-core needs hardware virtualization (vmx or svm in \
             /proc/cpuinfo) and this CPU has none; use vmm = \"qemu\" or \"auto\""
                .into(),
        )),
        VmmChoice::Auto if hw && program("vmm-core").is_ok() => Ok((
            "vmm-core",
            "auto: this CPU has hardware virtualization and /dev/kvm is there, so vmm-core".into(),
        )),
        VmmChoice::Auto if hw => Ok((
            "qemu",
            "auto: vmm-core is not built beside the orchestrator, so QEMU with KVM".into(),
        )),
        VmmChoice::Auto => Ok((
            "qemu",
            "auto: this CPU has no hardware virtualization (no vmx/svm), so QEMU with TCG".into(),
        )),
    }
}

/// The vmm-core the units of a config run (None: QEMU). Units may be made
/// on one machine for another, so `core` is taken as said; `auto` decides
/// by this machine, as `run` would.
pub fn units_vmm_core(choice: VmmChoice) -> Result<Option<PathBuf>, VmError> {
    match choice {
        VmmChoice::Qemu => Ok(None),
        VmmChoice::Core => program("vmm-core").map(Some),
        VmmChoice::Auto => match choose_vmm(VmmChoice::Auto)?.0 {
            "vmm-core" => program("vmm-core").map(Some),
            _ => Ok(None),
        },
    }
}

/// A program of this workspace: beside the running binary, else on PATH.
pub fn program(name: &'static str) -> Result<PathBuf, VmError> {
    if let Ok(me) = std::env::current_exe() {
        let beside = me.with_file_name(name);
        if beside.is_file() {
            return Ok(beside);
        }
    }
    crate::find_program(name).ok_or(VmError::Missing { name })
}

/// The backend command lines for a config (device names fs0.., blk0..),
/// for a VM whose state lives in `state_root`.
pub fn device_specs(cfg: &VmConfig, state_root: &Path) -> Result<Vec<DeviceSpec>, VmError> {
    let mut v = Vec::new();
    for (i, f) in cfg.fs.iter().enumerate() {
        let mut spec = fs_spec(i, f)?;
        // The guest's session outlives a crashed daemon: its successor
        // resumes it from here.
        spec.args.push(format!(
            "--state-file={}",
            state_root.join(format!("{}.state", spec.name)).display()
        ));
        v.push(spec);
    }
    for (i, b) in cfg.blk.iter().enumerate() {
        v.push(blk_spec(i, b)?);
    }
    for (i, n) in cfg.net.iter().enumerate() {
        let mut spec = net_spec(i, n)?;
        if let NetLink::User {
            tcp_forward,
            udp_forward,
        } = &n.link
        {
            let socket = state_root.join(format!("net{i}-nat.passt.sock"));
            let helper = passt_spec(i, tcp_forward, udp_forward, &socket)?;
            spec.args.extend([
                format!("--socket={}", socket.display()),
                "--socket-type=stream".into(),
                format!("--mtu={USER_MTU}"),
            ]);
            spec.follows = Some(helper.name.clone());
            v.push(helper);
        }
        v.push(spec);
    }
    Ok(v)
}

/// The guest's side of a user-mode network, as QEMU's own user-mode
/// network lays it out.
pub const USER_GUEST_IP: &str = "10.0.2.15/24";
pub const USER_GATEWAY: &str = "10.0.2.2";
pub const USER_DNS: &str = "10.0.2.3";
/// passt's own default MTU: large frames make up for the offloads a
/// stream link cannot carry.
const USER_MTU: u16 = 65520;

/// passt, serving NIC `i`'s user-mode network at `socket`.
fn passt_spec(
    i: usize,
    tcp_forward: &[String],
    udp_forward: &[String],
    socket: &Path,
) -> Result<DeviceSpec, VmError> {
    let program = crate::find_program("passt").ok_or(VmError::NoPasst(i))?;
    // SAFETY: getuid and getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut args: Vec<String> = vec![
        // In the foreground, logging to stderr (the device's log).
        "--foreground".into(),
        "--stderr".into(),
        // As whoever runs the VM (passt would switch root to nobody, who
        // cannot make its socket in the VM's state directory); it confines
        // itself either way.
        format!("--runas={uid}:{gid}"),
        format!("--socket={}", socket.display()),
        "--address".into(),
        USER_GUEST_IP.split('/').next().unwrap_or_default().into(),
        "--netmask".into(),
        "24".into(),
        "--gateway".into(),
        USER_GATEWAY.into(),
        "--dns-forward".into(),
        USER_DNS.into(),
        format!("--mtu={USER_MTU}"),
    ];
    for (flag, list) in [("--tcp-ports", tcp_forward), ("--udp-ports", udp_forward)] {
        if list.is_empty() {
            // passt would forward every port otherwise.
            args.push(format!("{flag}=none"));
        }
        args.extend(list.iter().map(|f| format!("{flag}={f}")));
    }
    Ok(DeviceSpec {
        name: format!("net{i}-nat"),
        program,
        args,
        ready_path: Some(socket.to_path_buf()),
        ..Default::default()
    })
}

/// Whether this host has a default route (passt takes its addresses and
/// routes from the interface that has one, and will not start without).
pub fn has_default_route() -> bool {
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v4 = v4.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 7 && f[1] == "00000000" && f[7] == "00000000"
    });
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    let v6 = v6.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() == 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00" && f[9] != "lo"
    });
    v4 || v6
}

/// Where a net backend finds its tap: one queue per fd from here on.
const TAP_FD: std::os::fd::RawFd = 4;

fn net_spec(i: usize, n: &NetDevice) -> Result<DeviceSpec, VmError> {
    let mut args = vec![format!("--mac={}", n.mac)];
    let mut open_tap = None;
    match &n.link {
        NetLink::Tap(name) => {
            open_tap = Some((name.clone(), n.queues));
            let fds: Vec<String> = (0..n.queues)
                .map(|q| (TAP_FD + i32::from(q)).to_string())
                .collect();
            args.push(format!("--tap-fd={}", fds.join(",")));
            if n.queues > 1 {
                args.push(format!("--num-queue-pairs={}", n.queues));
            }
        }
        NetLink::Socket(p) => args.push(format!("--socket={}", p.display())),
        NetLink::Listen(p) => args.push(format!("--socket-listen={}", p.display())),
        // Its passt and socket come from `device_specs`.
        NetLink::User { .. } => {}
    }
    Ok(DeviceSpec {
        name: format!("net{i}"),
        program: program("net-backend")?,
        args,
        pass_fds: Vec::new(),
        open_tap,
        ..Default::default()
    })
}

/// virtiofsd-fast's flags for a share.
fn fs_args(f: &FsDevice) -> Vec<String> {
    let mut args = vec![
        format!("--shared-dir={}", f.shared_dir.display()),
        format!("--tag={}", f.tag),
    ];
    if let Some(c) = &f.cache {
        args.push(format!("--cache={c}"));
    }
    if f.announce_submounts {
        args.push("--announce-submounts".into());
    }
    if f.xattr {
        args.push("--xattr".into());
    }
    if f.posix_acl {
        args.push("--posix-acl".into());
    }
    args
}

fn fs_spec(i: usize, f: &FsDevice) -> Result<DeviceSpec, VmError> {
    backend_spec(format!("fs{i}"), "virtiofsd-fast", fs_args(f))
}

fn blk_spec(i: usize, b: &BlkDevice) -> Result<DeviceSpec, VmError> {
    backend_spec(format!("blk{i}"), "blk-backend", blk_args(b))
}

/// A backend of ours with these flags, on a socket of its own.
fn backend_spec(
    name: String,
    binary: &'static str,
    args: Vec<String>,
) -> Result<DeviceSpec, VmError> {
    Ok(DeviceSpec {
        name,
        program: program(binary)?,
        args,
        ..Default::default()
    })
}

/// blk-backend's flags for a [[blk]] entry.
fn blk_args(b: &BlkDevice) -> Vec<String> {
    let mut args = vec![format!("--image={}", b.image.display())];
    if b.readonly {
        args.push("--readonly".into());
    }
    if b.direct {
        args.push("--direct".into());
    }
    if let Some(q) = b.queues {
        args.push(format!("--num-queues={q}"));
    }
    if let Some(s) = &b.serial {
        args.push(format!("--serial={s}"));
    }
    args
}

/// The config `orchestrator run` uses without a file: the current
/// directory shared as `host` (mounted at /mnt/host), a sparse 1 GiB
/// scratch disk in the state directory, and a user-mode network on
/// net-backend through passt (QEMU's own user-mode network where passt is
/// not installed or the host has no default route for it).
pub fn default_config(state_dir: &Path) -> Result<VmConfig, VmError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let disk = state_dir.join("scratch.img");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&disk)
        .map_err(|source| VmError::Scratch {
            path: disk.clone(),
            source,
        })?;
    if f.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
        f.set_len(1 << 30).map_err(|source| VmError::Scratch {
            path: disk.clone(),
            source,
        })?;
    }
    Ok(VmConfig {
        name: "default".into(),
        kernel: None,
        initramfs: None,
        cmdline: None,
        cpus: 1,
        memory_mib: 1024,
        hugepages: false,
        vmm: VmmChoice::Auto,
        fs: vec![FsDevice {
            shared_dir: cwd,
            tag: "host".into(),
            cache: None,
            announce_submounts: false,
            xattr: false,
            posix_acl: false,
        }],
        blk: vec![BlkDevice {
            image: disk,
            readonly: false,
            direct: false,
            queues: None,
            serial: Some("scratch".into()),
        }],
        net: default_nic().into_iter().collect(),
    })
}

/// The default VM's NIC: user-mode through passt, where it can run.
fn default_nic() -> Option<NetDevice> {
    let why_not = if crate::find_program("passt").is_none() {
        "passt is not installed (apt-get install passt)"
    } else if !has_default_route() {
        "this host has no default route, which passt needs"
    } else {
        return Some(NetDevice {
            link: NetLink::User {
                tcp_forward: Vec::new(),
                udp_forward: Vec::new(),
            },
            mac: "52:54:00:12:34:56".into(),
            queues: 1,
        });
    };
    eprintln!("orchestrator: net: QEMU's user-mode network, since {why_not}");
    None
}

/// The QEMU invocation for `cfg`, with device i on `sockets[i]` (in the
/// order of [`device_specs`]).
pub fn qemu_for(cfg: &VmConfig, sockets: &[PathBuf]) -> Qemu {
    vmm_for(cfg, sockets, None)
}

/// [`qemu_for`], or with `vmm_core` the same VM under vmm-core (which has
/// no user-mode network: a VM without a `[[net]]` has no NIC there).
pub fn vmm_for(cfg: &VmConfig, sockets: &[PathBuf], vmm_core: Option<&Path>) -> Qemu {
    let mut q = Qemu::new()
        .cpus(cfg.cpus)
        .memory_mib(cfg.memory_mib)
        .hugepages(cfg.hugepages);
    if let Some(k) = &cfg.kernel {
        let mut image = qemu::default_image_config();
        image.kernel = Some(k.clone());
        q = q.image(image);
    }
    let (fs_sockets, rest) = sockets.split_at(cfg.fs.len().min(sockets.len()));
    let (blk_sockets, net_sockets) = rest.split_at(cfg.blk.len().min(rest.len()));
    for (f, socket) in cfg.fs.iter().zip(fs_sockets) {
        let mount = if f.tag == "host" {
            "/mnt/host".to_string()
        } else {
            format!("/mnt/{}", f.tag)
        };
        q = q
            .fs(socket, &f.tag)
            .kernel_arg(format!("testbed.fs={}:{mount}", f.tag));
    }
    for socket in blk_sockets {
        // Under QEMU the socket is a relay's, which keeps the device across
        // backend restarts (QEMU's own reconnect polls once a second).
        q = if vmm_core.is_some() {
            q.blk_reconnecting(socket)
        } else {
            q.blk(socket)
        };
    }
    for (n, socket) in cfg.net.iter().zip(net_sockets) {
        q = if vmm_core.is_some() {
            q.net_reconnecting(socket, &n.mac, n.queues)
        } else {
            q.net_queues(socket, &n.mac, n.queues)
        };
        if matches!(n.link, NetLink::User { .. }) {
            q = q.nic_mtu(USER_MTU);
        }
    }
    if matches!(cfg.net.first(), Some(n) if matches!(n.link, NetLink::User { .. })) {
        // The guest's eth0 on the user-mode network.
        q = q
            .kernel_arg(format!("testbed.ip={USER_GUEST_IP},{USER_GATEWAY}"))
            .kernel_arg(format!("testbed.dns={USER_DNS}"));
    }
    if let Some(c) = &cfg.cmdline {
        for a in c.split_whitespace() {
            q = q.kernel_arg(a);
        }
    }
    match vmm_core {
        Some(path) => q = q.vmm_core(path),
        // Without a NIC of its own, the guest gets QEMU's user-mode network.
        None if cfg.net.is_empty() => q = q.user_net(),
        None => {}
    }
    q
}

/// A running VM's backends, supervised on a thread of their own.
pub struct Running {
    pub supervisor: Arc<Mutex<Supervisor>>,
    stop: Arc<AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
    pub qemu: Qemu,
    /// The relays' sockets (QEMU's side of each share).
    relays: Vec<PathBuf>,
}

/// Start every backend of `cfg` and prepare the VMM around their sockets.
pub fn start(cfg: &VmConfig, state: StateDir, verbose: bool) -> Result<Running, VmError> {
    let (vmm, why) = choose_vmm(cfg.vmm)?;
    eprintln!("orchestrator: vmm: {vmm} ({why})");
    if let Some(i) = &cfg.initramfs {
        return Err(VmError::Choice(format!(
            "vm.initramfs = {}: QEMU boots the default initramfs for now; leave it out",
            i.display()
        )));
    }
    let specs = device_specs(cfg, &state.root)?;
    for f in (0..cfg.fs.len()).map(|i| state.root.join(format!("fs{i}.state"))) {
        // A new VM: nothing to resume.
        let _ = std::fs::remove_file(f);
    }
    let mut sup = Supervisor::new(state, vmm, verbose);
    let mut sockets = Vec::new();
    let mut relays = Vec::new();
    for mut spec in specs {
        if let Some((name, queues)) = spec.open_tap.clone() {
            // Opened here, so the backend needs no CAP_NET_ADMIN, and kept
            // here, so the tap outlives a backend restart.
            let taps = net_backend::link::Tap::open_queues(&name, usize::from(queues))
                .map_err(|source| VmError::Tap { name, source })?;
            for (q, tap) in taps.into_iter().enumerate() {
                spec.pass_fds
                    .push((Arc::new(tap.into_fd()), TAP_FD + q as i32));
            }
        }
        eprintln!(
            "orchestrator: starting {}: {}",
            spec.name,
            spec.command_line().join(" ")
        );
        let name = spec.name.clone();
        let helper = spec.ready_path.is_some();
        let socket = sup.add(spec)?;
        if helper {
            // It serves a backend, not the VMM.
            continue;
        }
        if vmm == "qemu" {
            // QEMU 7.2 cannot reconnect vhost-user-fs, and reconnects disks
            // and NICs only once a second: it talks to a relay that
            // survives the backend's restarts (see relay.rs).
            let front = sup.state().root.join(format!("{name}.vmm.sock"));
            let _ = std::fs::remove_file(&front);
            let listener = std::os::unix::net::UnixListener::bind(&front).map_err(|source| {
                VmError::Scratch {
                    path: front.clone(),
                    source,
                }
            })?;
            crate::relay::spawn(name, listener, socket).map_err(|source| VmError::Scratch {
                path: front.clone(),
                source,
            })?;
            relays.push(front.clone());
            sockets.push(front);
        } else {
            sockets.push(socket);
        }
    }
    let core = match vmm {
        "vmm-core" => Some(program("vmm-core")?),
        _ => None,
    };
    let q = vmm_for(cfg, &sockets, core.as_deref());
    let control = sup.state().root.join("control.sock");
    let supervisor = Arc::new(Mutex::new(sup));
    crate::control::serve(&control, Arc::clone(&supervisor)).map_err(|source| {
        VmError::Scratch {
            path: control.clone(),
            source,
        }
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let supervisor = Arc::clone(&supervisor);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut s) = supervisor.lock() {
                    s.poll();
                }
                // A dead backend is seen within this, and the guest's
                // requests wait that much longer: keep it short (a poll is
                // a waitpid per device).
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    Ok(Running {
        supervisor,
        stop,
        watcher: Some(watcher),
        qemu: q,
        relays,
    })
}

impl Running {
    /// Stop supervising and bring the backends down.
    pub fn down(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        if let Ok(mut s) = self.supervisor.lock() {
            s.shutdown(Duration::from_secs(5));
        }
        for r in &self.relays {
            let _ = std::fs::remove_file(r);
        }
    }
}

#[cfg(test)]
mod fs_spec_tests {
    use super::*;

    #[test]
    fn fs_settings_become_virtiofsd_fast_flags() {
        let mut f = FsDevice {
            shared_dir: PathBuf::from("/srv/share"),
            tag: "project".into(),
            cache: Some("always".into()),
            announce_submounts: true,
            xattr: false,
            posix_acl: true,
        };
        let args = fs_args(&f);
        assert!(args.contains(&"--cache=always".to_string()), "{args:?}");
        assert!(
            args.contains(&"--announce-submounts".to_string()),
            "{args:?}"
        );
        assert!(args.contains(&"--posix-acl".to_string()), "{args:?}");
        f.announce_submounts = false;
        f.posix_acl = false;
        let args = fs_args(&f);
        assert!(!args
            .iter()
            .any(|a| a == "--announce-submounts" || a == "--posix-acl"));
    }

    #[test]
    fn blk_settings_become_blk_backend_flags() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["d.img", "e.img"] {
            std::fs::write(dir.path().join(f), b"").unwrap();
        }
        let cfg = crate::config::parse(
            "vm.toml",
            "[vm]\n[[blk]]\nimage = \"d.img\"\ndirect = true\nreadonly = true\nqueues = 2\n\
             [[blk]]\nimage = \"e.img\"\n",
            dir.path(),
        )
        .unwrap();
        let d = format!("--image={}", dir.path().join("d.img").display());
        let e = format!("--image={}", dir.path().join("e.img").display());
        assert_eq!(
            blk_args(&cfg.blk[0]),
            [d.as_str(), "--readonly", "--direct", "--num-queues=2"]
        );
        assert_eq!(blk_args(&cfg.blk[1]), [e]);
    }
}

#[cfg(test)]
mod user_net_tests {
    use super::*;

    /// passt forwards exactly the ports asked for: none of a kind asked
    /// for is `none`, since passt alone would forward them all.
    #[test]
    fn passt_forwards_the_ports_asked_for_and_no_others() {
        if crate::find_program("passt").is_none() {
            backend_common::skip_or_fail("passt is not installed (apt-get install passt)");
            return;
        }
        let sock = Path::new("/run/n.sock");
        let args = |tcp: &[&str], udp: &[&str]| {
            let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
            passt_spec(0, &s(tcp), &s(udp), sock).unwrap().args
        };
        let a = args(&[], &[]);
        assert!(a.contains(&"--tcp-ports=none".into()), "{a:?}");
        assert!(a.contains(&"--udp-ports=none".into()), "{a:?}");
        let a = args(&["8080:80"], &["5353:53", "7000-7001"]);
        let ports: Vec<&String> = a.iter().filter(|x| x.contains("-ports=")).collect();
        assert_eq!(
            ports,
            [
                "--tcp-ports=8080:80",
                "--udp-ports=5353:53",
                "--udp-ports=7000-7001"
            ]
        );
    }

    #[test]
    fn a_user_mode_nic_gets_its_address_dns_and_mtu() {
        let cfg = VmConfig {
            name: "u".into(),
            kernel: None,
            initramfs: None,
            cmdline: None,
            cpus: 1,
            memory_mib: 512,
            hugepages: false,
            vmm: VmmChoice::Qemu,
            fs: Vec::new(),
            blk: Vec::new(),
            net: vec![NetDevice {
                link: NetLink::User {
                    tcp_forward: vec!["8080:80".into()],
                    udp_forward: Vec::new(),
                },
                mac: "52:54:00:12:34:56".into(),
                queues: 1,
            }],
        };
        let q = qemu_for(&cfg, &[PathBuf::from("/run/n.sock")]);
        let cmd = q.command(Path::new("/k"), Path::new("/i"));
        let line: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = line.join(" ");
        assert!(line.contains("host_mtu=65520"), "{line}");
        assert!(line.contains("testbed.ip=10.0.2.15/24,10.0.2.2"), "{line}");
        assert!(line.contains("testbed.dns=10.0.2.3"), "{line}");
        assert!(!line.contains("-netdev user"), "{line}");
    }
}
