//! The orchestrator end to end, with QEMU as the VMM: the README's main job
//! (`orchestrator run -- CMD`), config errors that start nothing, and a
//! backend killed with -9 under a running guest, restarted, with the
//! guest's disk working afterwards.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use orchestrator::state::VmStatus;

const ORCH: &str = env!("CARGO_BIN_EXE_orchestrator");

/// The backends are found beside the orchestrator binary; a test build
/// puts them in the same target directory when the workspace is built.
fn backends_built() -> bool {
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

fn orchestrator_tests_require(r: Result<(), String>) -> bool {
    match r {
        Ok(()) => true,
        Err(why) if std::env::var_os("CI").is_some() => panic!("{why} (CI is set)"),
        Err(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

fn orch(runtime: &Path, cwd: &Path) -> Command {
    let mut c = Command::new(ORCH);
    c.env("XDG_RUNTIME_DIR", runtime).current_dir(cwd);
    c
}

#[test]
fn run_lists_the_current_directory_and_passes_the_exit_code() {
    if !backends_built() {
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(cwd.path().join("hello-from-the-host.txt"), b"hi").unwrap();
    let out = orch(runtime.path(), cwd.path())
        .args([
            "run",
            "--",
            "ls /mnt/host; cat /sys/block/vda/serial; echo; exit 7",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("hello-from-the-host.txt"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("scratch"),
        "the scratch disk's serial: {stdout}"
    );
    assert!(stderr.contains("vmm: qemu"), "{stderr}");
    // Everything is cleaned up: no sockets left, no status file.
    let sockets = runtime.path().join("vmm/default/sockets");
    assert_eq!(std::fs::read_dir(&sockets).unwrap().count(), 0);
    assert!(!runtime.path().join("vmm/default/status.json").exists());
}

#[test]
fn config_errors_start_nothing() {
    let runtime = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str, want: &[&str]| {
        let f = dir.path().join("vm.toml");
        std::fs::write(&f, text).unwrap();
        let out = orch(runtime.path(), dir.path())
            .args(["run", "-f"])
            .arg(&f)
            .args(["--", "true"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        for w in want {
            assert!(err.contains(w), "missing `{w}` in: {err}");
        }
        // Nothing was started: no state directory for the VM.
        assert!(!runtime.path().join("vmm/bad").exists(), "{err}");
    };
    check(
        "[vm]\nname = \"bad\"\nkernel = \"/nonexistent/vmlinuz\"\n",
        &["vm.toml:3:", "vm.kernel", "/nonexistent/vmlinuz"],
    );
    check(
        "[vm]\nname = \"bad\"\n[[fs]]\nshared_dir = \"/nonexistent/dir\"\ntag = \"a\"\n",
        &["vm.toml:4:", "fs[0].shared_dir"],
    );
    check(
        "[vm]\nname = \"bad\"\n[[fs]]\nshared_dir = \"/tmp\"\ntag = \"a\"\n[[fs]]\nshared_dir = \"/\"\ntag = \"a\"\n",
        &["vm.toml:8:", "already used"],
    );
    check(
        "[vm]\nname = \"bad\"\ncpu = 2\n",
        &["vm.toml:3:1", "unknown field `cpu`"],
    );
    // An image another VM's backend holds.
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let holder = std::fs::File::open(&img).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on our own descriptor.
    assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);
    check(
        &format!(
            "[vm]\nname = \"bad\"\n[[blk]]\nimage = \"{}\"\n",
            img.display()
        ),
        &["vm.toml:4:", "in use by another VM"],
    );
}

#[test]
fn a_killed_disk_backend_is_restarted_and_the_guest_keeps_its_disk() {
    if !backends_built() {
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let cfg = dir.path().join("vm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[vm]\nname = \"restart\"\nvmm = \"qemu\"\n[[fs]]\nshared_dir = \"{}\"\ntag = \"host\"\n\
             [[blk]]\nimage = \"{}\"\n",
            dir.path().display(),
            img.display()
        ),
    )
    .unwrap();
    // The guest writes, waits while the host kills the disk's backend,
    // then reads back and writes again through the restarted one.
    let script = "dd if=/dev/urandom of=/tmp/a bs=64k count=64 2>/dev/null; \
        dd if=/tmp/a of=/dev/vda bs=64k oflag=direct 2>/dev/null; \
        A=$(md5sum < /tmp/a); echo PHASE1; \
        while [ ! -e /mnt/host/go ]; do sleep 0.2; done; \
        B=$(dd if=/dev/vda bs=64k count=64 iflag=direct 2>/dev/null | md5sum); \
        dd if=/dev/urandom of=/dev/vda bs=64k count=16 seek=100 oflag=direct 2>/dev/null && echo WRITE=ok; \
        [ \"$A\" = \"$B\" ] && echo VERIFY=ok";
    let mut child = orch(runtime.path(), dir.path())
        .args(["run", "-f"])
        .arg(&cfg)
        .args(["--timeout", "300", "--", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s).unwrap();
        s
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = Vec::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        let phase1 = l.contains("PHASE1");
        out.push(l);
        if phase1 {
            break;
        }
    }
    assert!(out.iter().any(|l| l.contains("PHASE1")), "{out:?}");
    let status = || VmStatus::read_in(runtime.path(), "restart").expect("status file");
    let blk = |s: &VmStatus| {
        s.devices
            .iter()
            .find(|d| d.device == "blk0")
            .unwrap()
            .clone()
    };
    let before = blk(&status());
    let pid = before.pid.expect("blk0 runs");
    // SAFETY: killing the backend the orchestrator started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = blk(&status());
        if now.restarts == 1 && now.pid.is_some_and(|p| p != pid) {
            break;
        }
        assert!(Instant::now() < deadline, "blk0 was not restarted: {now:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // `status` shows the restart.
    let st = orch(runtime.path(), dir.path())
        .args(["status", "--name", "restart"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&st.stdout);
    let row = table
        .lines()
        .find(|l| l.starts_with("blk0"))
        .unwrap_or_default();
    assert!(row.split_whitespace().nth(3) == Some("1"), "{table}");
    // QEMU reconnects within a second or so; then let the guest go on.
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(dir.path().join("go"), b"").unwrap();
    for l in lines {
        out.push(l.unwrap());
    }
    let code = child.wait().unwrap();
    let err = err_thread.join().unwrap();
    let text = out.join("\n");
    assert!(
        text.contains("WRITE=ok") && text.contains("VERIFY=ok"),
        "{text}\n{err}"
    );
    assert!(code.success(), "{text}\n{err}");
    assert!(err.contains("blk0 exited"), "{err}");
}
