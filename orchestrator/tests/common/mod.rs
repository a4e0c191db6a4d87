//! What the orchestrator's system test files share: the built binaries,
//! a VM config with a share and a disk, running a guest script through
//! `orchestrator run` and reading its output as it comes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use orchestrator::state::VmStatus;

pub const ORCH: &str = env!("CARGO_BIN_EXE_orchestrator");

/// The backends are found beside the orchestrator binary; a test build
/// puts them in the same target directory when the workspace is built.
pub fn backends_built() -> bool {
    let dir = Path::new(ORCH).parent().unwrap();
    let ok = ["virtiofsd-fast", "blk-backend"]
        .iter()
        .all(|b| dir.join(b).is_file());
    if !ok {
        let why = format!(
            "virtiofsd-fast and blk-backend are not built in {} (cargo build --workspace)",
            dir.display()
        );
        return orchestrator_tests_require(Err(why));
    }
    orchestrator_tests_require(orchestrator::qemu::qemu_available())
}

pub fn orchestrator_tests_require(r: Result<(), String>) -> bool {
    match r {
        Ok(()) => true,
        Err(why) if std::env::var_os("CI").is_some() => panic!("{why} (CI is set)"),
        Err(why) => {
            let _ =
                std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("skipped: {why}\n"));
            false
        }
    }
}

/// A config for VM `name` under QEMU sharing `dir` as `host`, with a
/// `disk_mib` MiB disk image made there; returns the config's path.
pub fn share_and_disk_vm(dir: &Path, name: &str, disk_mib: u64) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(disk_mib << 20)
        .unwrap();
    let cfg = dir.join("vm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[vm]\nname = \"{name}\"\nvmm = \"qemu\"\n[[fs]]\nshared_dir = \"{}\"\ntag = \"host\"\n\
             [[blk]]\nimage = \"{}\"\n",
            dir.display(),
            img.display()
        ),
    )
    .unwrap();
    cfg
}

pub fn orch(runtime: &Path, cwd: &Path) -> Command {
    let mut c = Command::new(ORCH);
    c.env("XDG_RUNTIME_DIR", runtime).current_dir(cwd);
    c
}

/// `orchestrator run -f CFG -- SCRIPT` in the background, with its stdout
/// and stderr readable while it runs.
pub fn run_in_guest(
    runtime: &Path,
    cwd: &Path,
    cfg: &Path,
    script: &str,
) -> (std::process::Child, Lines, Lines) {
    let mut run = orch(runtime, cwd);
    run.args(["run", "-f"])
        .arg(cfg)
        .args(["--timeout", "300", "--", script]);
    spawn_piped(run)
}

/// Start `c` with its stdout and stderr read line by line, in that order.
pub fn spawn_piped(mut c: Command) -> (std::process::Child, Lines, Lines) {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Lines::of(child.stdout.take().unwrap());
    let err = Lines::of(child.stderr.take().unwrap());
    (child, out, err)
}

/// Find `name` anywhere under `dir`.
pub fn find_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

/// Lines of a child's stream, collected on a thread, readable while it runs.
pub struct Lines(pub std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Lines {
    pub fn of(stream: impl std::io::Read + Send + 'static) -> Self {
        let v = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let w = std::sync::Arc::clone(&v);
        std::thread::spawn(move || {
            for l in BufReader::new(stream).lines() {
                let Ok(l) = l else { break };
                w.lock().unwrap().push(l);
            }
        });
        Lines(v)
    }
    pub fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }
    pub fn wait_for(&self, what: &str, secs: u64, also: &dyn Fn() -> String) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !self.text().contains(what) {
            assert!(
                Instant::now() < deadline,
                "no `{what}` within {secs} s:\n{}\n--- other ---\n{}",
                self.text(),
                also()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Shell functions for a guest script: `w NAME AT` writes 1 MiB of
/// random data to /dev/vda at AT x 64 KiB (kept as /tmp/NAME), `r NAME AT`
/// reads it back and prints NAME=ok when it matches, `wait_for FILE` waits
/// for FILE to appear in the share.
pub const DISK_FNS: &str = "w() { dd if=/dev/urandom of=/tmp/$1 bs=64k count=16 2>/dev/null; \
      dd if=/tmp/$1 of=/dev/vda bs=64k seek=$2 oflag=direct 2>/dev/null; }; \
    r() { dd if=/dev/vda bs=64k skip=$2 count=16 iflag=direct 2>/dev/null | cmp - /tmp/$1 && echo \"$1=ok\"; }; \
    wait_for() { while [ ! -e /mnt/host/$1 ]; do sleep 0.2; done; }; ";

/// The pid of backend `dev` of VM `name` now, and how often it restarted.
pub fn device_now(runtime: &Path, name: &str, dev: &str) -> (Option<u32>, u32) {
    let d = VmStatus::read_in(runtime, name)
        .expect("status file")
        .devices
        .into_iter()
        .find(|d| d.device == dev)
        .unwrap_or_else(|| panic!("no device {dev}"));
    (d.pid, d.restarts)
}

/// A network namespace of the test's, deleted on drop.
pub struct Netns(pub String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

impl Netns {
    /// Run `f` on a thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only, with a namespace fd.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

/// What a user-mode NIC test needs (the backends, passt, root), and a
/// network namespace whose default route (a veth pair going nowhere) is
/// what passt takes its addresses from; None, said why, where not.
pub fn passt_netns(tag: &str) -> Option<Netns> {
    if !backends_built() {
        return None;
    }
    let built = Path::new(ORCH)
        .parent()
        .unwrap()
        .join("net-backend")
        .is_file();
    if !orchestrator_tests_require(if built {
        Ok(())
    } else {
        Err("net-backend is not built (cargo build --workspace)".into())
    }) || !orchestrator_tests_require(
        orchestrator::find_program("passt")
            .map(drop)
            .ok_or_else(|| "passt not found (apt-get install passt)".into()),
    ) {
        return None;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        orchestrator_tests_require(Err("a network namespace needs root".into()));
        return None;
    }
    let name = format!("vmm{tag}{}", std::process::id() % 100_000);
    assert!(Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap()
        .success());
    let ns = Netns(name);
    for args in [
        "ip link set lo up",
        "ip link add up0 type veth peer name up1",
        "ip link set up1 up",
        "ip link set up0 up",
        "ip addr add 192.0.2.2/24 dev up0",
        "ip route add default via 192.0.2.1",
    ] {
        let st = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .args(args.split(' '))
            .status()
            .unwrap();
        assert!(st.success(), "{args}");
    }
    Some(ns)
}
