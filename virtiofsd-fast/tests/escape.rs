//! A guest trying to get the daemon to open a host device: device nodes and
//! FIFOs it makes in the share are never opened, not even when a rename
//! races the lookup that names them, and the jail holds nothing beyond the
//! share (nodev, nosuid) and /proc's process entries.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{can_mknod, client, start};
use tests::frontend::DeviceOptions;
use tests::fs::{self, op, FsError, FuseClient, ROOT_ID};
use tests::queue::{ReqQueue, Shape};

/// makedev(1, 3), the host's /dev/null, as FUSE and mknod(2) encode it.
const NULL_RDEV: u32 = (1 << 8) | 3;
const S_IFMT: u32 = libc::S_IFMT;

fn mknod_on_host(path: &Path, mode: u32, rdev: u32) {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string; mknod takes no other pointers.
    let rc = unsafe { libc::mknod(p.as_ptr(), mode, libc::dev_t::from(rdev)) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

#[test]
fn device_nodes_and_fifos_the_guest_makes_are_never_opened() {
    if !can_mknod() {
        return;
    }
    for sandbox in ["namespace", "none"] {
        let dir = tempfile::tempdir().unwrap();
        let mut b = start(dir.path(), &[&format!("--sandbox={sandbox}")]);
        let mut c = client(&mut b);
        let null = c
            .mknod(ROOT_ID, "null", libc::S_IFCHR | 0o666, NULL_RDEV)
            .unwrap_or_else(|e| panic!("{sandbox}: MKNOD: {e}\n{}", b.output()));
        assert_eq!(null.attr.mode & S_IFMT, libc::S_IFCHR);
        let fifo = c.mknod(ROOT_ID, "fifo", libc::S_IFIFO | 0o666, 0).unwrap();
        for (name, e) in [("null", null), ("fifo", fifo)] {
            for flags in [libc::O_RDONLY, libc::O_RDWR] {
                let r = c.open(e.nodeid, flags as u32);
                assert!(
                    r.is_err(),
                    "{sandbox}: OPEN of {name} ({flags:#o}) succeeded"
                );
            }
            // CREATE without O_EXCL of a name that exists opens it: never
            // when it is not a regular file.
            let r = c.create(ROOT_ID, name, 0o644, libc::O_RDWR as u32);
            assert!(
                matches!(r, Err(FsError::Errno(libc::ENXIO))),
                "{sandbox}: CREATE over {name}: {r:?}"
            );
        }
        // What the guest made is still there, as it made it.
        let meta = std::fs::symlink_metadata(dir.path().join("null")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &meta.file_type()
        ));
        assert!(b.is_running(), "{}", b.output());
    }
}

/// The guest renames a device node over a regular file's name (and back)
/// on one request queue while it looks the name up on another: whatever
/// node a LOOKUP returns, OPEN of a regular file's node opens that regular
/// file, and OPEN of the device's node fails.
#[test]
fn a_rename_racing_a_lookup_never_gets_a_device_opened() {
    if !can_mknod() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t"), b"regular").unwrap();
    mknod_on_host(&dir.path().join("d"), libc::S_IFCHR | 0o666, NULL_RDEV);
    // No sandbox: only the daemon's own checks stand between the guest and
    // the device (the jail's nodev would hide a missing one).
    let mut b = start(dir.path(), &["--request-queues=2", "--sandbox=none"]);
    let mut dev = b
        .device(&DeviceOptions {
            queues: 3,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
    let ring = dev.queues.remove(2);
    let mut renames = ReqQueue::new(ring, &mut dev.mem, 4, 4096, 4096).unwrap();
    let mut c = FuseClient::on_device(dev, 8).unwrap();
    c.set_timeout(std::time::Duration::from_secs(5));
    c.init().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            let mut unique = 1u64 << 40;
            let args = fs::rename2_args(ROOT_ID, "t", "d", libc::RENAME_EXCHANGE);
            while !stop.load(Ordering::Relaxed) {
                unique += 2;
                let hdr = fs::in_header((40 + args.len()) as u32, op::RENAME2, unique, ROOT_ID);
                let done = renames.call(&[&hdr, &args], &[16], Shape::DIRECT).unwrap();
                fs::parse_reply(&done, unique).expect("RENAME2 with RENAME_EXCHANGE");
                swaps += 1;
            }
            swaps
        })
    };
    let (mut regular, mut device, mut stale) = (0u32, 0u32, 0u32);
    for round in 0..20_000 {
        let e = c
            .lookup(ROOT_ID, "t")
            .unwrap_or_else(|e| panic!("round {round}: LOOKUP: {e}\n{}", b.output()));
        match e.attr.mode & S_IFMT {
            libc::S_IFREG => {
                regular += 1;
                match c.open(e.nodeid, libc::O_RDONLY as u32) {
                    Ok(fh) => {
                        let data = c.read(e.nodeid, fh, 0, 64).unwrap();
                        assert_eq!(
                            data, b"regular",
                            "round {round}: OPEN of a regular file's node opened something else"
                        );
                        c.release(e.nodeid, fh).unwrap();
                    }
                    Err(FsError::Errno(libc::ESTALE)) => stale += 1,
                    Err(err) => panic!("round {round}: OPEN: {err}"),
                }
            }
            libc::S_IFCHR => {
                device += 1;
                let r = c.open(e.nodeid, libc::O_RDONLY as u32);
                assert!(
                    r.is_err(),
                    "round {round}: OPEN of the device node succeeded"
                );
            }
            m => panic!("round {round}: LOOKUP returned mode {m:o}"),
        }
        c.forget(e.nodeid, 1).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    eprintln!("lookups: {regular} regular, {device} device, {stale} stale; {swaps} swaps");
    assert!(
        regular > 0 && device > 0,
        "the rename never raced the lookups"
    );
    assert!(b.is_running(), "{}", b.output());
}

#[test]
fn the_jail_holds_the_share_nodev_nosuid_and_only_process_entries_of_proc() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = start(dir.path(), &["--sandbox=namespace"]);
    let _c = client(&mut b);
    let pid = b.serving_pid().unwrap();
    let root = format!("/proc/{pid}/root");
    for p in [
        "sys",
        "sys/kernel/core_pattern",
        "sysrq-trigger",
        "kcore",
        "sys/vm",
    ] {
        let path = format!("{root}/proc/{p}");
        assert!(
            std::fs::OpenOptions::new().write(true).open(&path).is_err(),
            "{path} opens for writing"
        );
        assert!(!Path::new(&path).exists(), "{path} exists in the jail");
    }
    // What the daemon does use is there: its own descriptors (it is pid 1
    // of its namespace).
    assert!(Path::new(&format!("{root}/proc/1/fd")).is_dir());
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let opts = |at: &str| {
        mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(at))
            .unwrap_or_else(|| panic!("no mount at {at}:\n{mountinfo}"))
            .split(' ')
            .nth(5)
            .unwrap()
            .to_string()
    };
    let share = opts("/share");
    assert!(
        share.split(',').any(|o| o == "nodev") && share.split(',').any(|o| o == "nosuid"),
        "the share's mount options in the jail: {share}"
    );
    assert!(opts("/proc").split(',').any(|o| o == "ro"), "{mountinfo}");
}

/// A descriptor the daemon inherits by accident (here: a file its parent
/// left open at 20) is closed before it serves, in the process that serves
/// and in the one that waits outside the sandbox.
#[test]
fn inherited_descriptors_are_closed() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let share = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fs.sock");
    let leaked = std::fs::File::open("/proc/self/exe").unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&leaked);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_virtiofsd-fast"));
    cmd.arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", share.path().display()))
        .stdin(std::process::Stdio::null());
    // SAFETY: dup2 and prctl between fork and exec, on descriptors we own.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::dup2(raw, 20) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "never listened");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The sandboxed child appears once the namespaces exist.
    let pid = child.id();
    let serving = loop {
        let kids =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(k) = kids.split_whitespace().next() {
            break k.parse::<u32>().unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "no sandboxed child");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // The parent closes what it inherited before it forks the child, so
    // both are past it now.
    for p in [pid, serving] {
        let fd = format!("/proc/{p}/fd/20");
        assert!(
            std::fs::read_link(&fd).is_err(),
            "{fd} is still open: {:?}",
            std::fs::read_link(&fd)
        );
    }
    child.kill().unwrap();
    let _ = child.wait();
}
