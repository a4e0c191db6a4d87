//! virtiofsd-fast served over a real vhost-user connection, driven by the
//! test frontend: normal requests, escape attempts, malformed requests, and
//! serving again after the frontend goes away.

use std::time::Duration;

mod common;

use common::{client, start};
use tests::frontend::BackendProcess;
use tests::fs::{self, op, FsError, FuseClient, ROOT_ID};
use tests::hostile;
use tests::queue::Shape;
use tests::ring::Seg;

#[test]
fn serves_the_share() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"hello from the host").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let mut b = start(dir.path(), &[]);
    let mut c = client(&mut b);

    let e = c.lookup(ROOT_ID, "hello.txt").unwrap();
    assert_eq!(e.attr.size, 19);
    let fh = c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(
        c.read(e.nodeid, fh, 0, 4096).unwrap(),
        b"hello from the host"
    );
    c.release(e.nodeid, fh).unwrap();
    assert_eq!(c.getattr(e.nodeid).unwrap().size, 19);

    c.shape = Shape::INDIRECT;
    let (n, fh) = c
        .create(ROOT_ID, "new.txt", 0o644, libc::O_WRONLY as u32)
        .unwrap();
    assert_eq!(c.write(n.nodeid, fh, 0, b"from the guest").unwrap(), 14);
    c.release(n.nodeid, fh).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("new.txt")).unwrap(),
        b"from the guest"
    );
    c.shape = Shape::DIRECT;

    let d = c.mkdir(ROOT_ID, "made", 0o755).unwrap();
    assert_eq!(d.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    let mut names: Vec<String> = c
        .readdirplus_all(ROOT_ID)
        .unwrap()
        .into_iter()
        .map(|d| String::from_utf8_lossy(&d.name).into_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    names.sort();
    assert_eq!(names, ["hello.txt", "made", "new.txt", "sub"]);
    c.unlink(ROOT_ID, "new.txt").unwrap();
    assert!(!dir.path().join("new.txt").exists());
    let (blocks, _, _) = c.statfs(ROOT_ID).unwrap();
    assert!(blocks > 0);
}

/// fuse_copy_file_range_in.
fn copy_in(
    fh_in: u64,
    off_in: u64,
    node_out: u64,
    fh_out: u64,
    off_out: u64,
    len: u64,
    flags: u64,
) -> Vec<u8> {
    [fh_in, off_in, node_out, fh_out, off_out, len, flags]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

#[test]
fn copy_file_range_and_syncfs_are_served_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(dir.path().join("src"), &data).unwrap();
    let mut b = start(dir.path(), &[]);
    let mut c = client(&mut b);

    let src = c.lookup(ROOT_ID, "src").unwrap();
    let fh_src = c.open(src.nodeid, libc::O_RDONLY as u32).unwrap();
    let (dst, fh_dst) = c
        .create(ROOT_ID, "dst", 0o644, libc::O_RDWR as u32)
        .unwrap();
    let a = copy_in(fh_src, 4096, dst.nodeid, fh_dst, 10, 100_000, 0);
    let body = c.call(op::COPY_FILE_RANGE, src.nodeid, &[&a], 8).unwrap();
    assert_eq!(u32::from_le_bytes(body[0..4].try_into().unwrap()), 100_000);
    let mut want = vec![0u8; 10];
    want.extend_from_slice(&data[4096..104_096]);
    assert_eq!(std::fs::read(dir.path().join("dst")).unwrap(), want);

    // Past the end of the source: nothing copied, not an error.
    let a = copy_in(fh_src, 400_000, dst.nodeid, fh_dst, 0, 10, 0);
    let body = c.call(op::COPY_FILE_RANGE, src.nodeid, &[&a], 8).unwrap();
    assert_eq!(u32::from_le_bytes(body[0..4].try_into().unwrap()), 0);
    // A handle the guest was never given, flags Linux never sends, a
    // handle of another node, a truncated request.
    for (a, errno) in [
        (copy_in(9999, 0, dst.nodeid, fh_dst, 0, 10, 0), libc::EBADF),
        (
            copy_in(fh_src, 0, dst.nodeid, fh_dst, 0, 10, 1),
            libc::EINVAL,
        ),
        (
            copy_in(fh_src, 0, src.nodeid, fh_dst, 0, 10, 0),
            libc::EBADF,
        ),
        (
            copy_in(fh_src, 0, dst.nodeid, fh_dst, 0, 10, 0)[..20].to_vec(),
            libc::EINVAL,
        ),
    ] {
        match c.call(op::COPY_FILE_RANGE, src.nodeid, &[&a], 8) {
            Err(FsError::Errno(e)) => assert_eq!(e, errno),
            other => panic!("expected errno {errno}, got {other:?}"),
        }
    }
    assert_eq!(
        std::fs::read(dir.path().join("dst")).unwrap().len(),
        100_010
    );

    // sync(2) in the guest: served (it used to be ENOSYS, which makes a
    // Linux guest stop asking, so its syncs never reached the host disk).
    c.call(op::SYNCFS, ROOT_ID, &[&[0u8; 8]], 0).unwrap();

    c.release(src.nodeid, fh_src).unwrap();
    c.release(dst.nodeid, fh_dst).unwrap();
    drop(c);
    // The per-opcode counts logged when the frontend goes.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !b.output().contains("requests served") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = b.output();
    let line = out
        .lines()
        .find(|l| l.contains("requests served"))
        .unwrap_or_else(|| panic!("no request counts logged:\n{out}"));
    assert!(line.contains("COPY_FILE_RANGE=6"), "{line}");
    assert!(line.contains("SYNCFS=1"), "{line}");
    assert!(b.is_running(), "{out}");
}

#[test]
fn a_listing_read_a_page_at_a_time_is_whole_and_a_rewind_sees_new_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut want: Vec<String> = (0..150)
        .map(|i| format!("entry-with-a-longer-name-{i:03}"))
        .collect();
    for n in &want {
        std::fs::write(dir.path().join(n), b"").unwrap();
    }
    let mut b = start(dir.path(), &[]);
    let mut c = client(&mut b);
    let fh = c.opendir(ROOT_ID).unwrap();
    // One page per request, as Linux 6.1 asks: 26 or so entries each, so
    // the host listing is read in several pieces from saved offsets.
    let read_all = |c: &mut FuseClient| {
        let (mut names, mut off, mut pages) = (Vec::new(), 0, 0);
        loop {
            let batch = c.readdirplus(ROOT_ID, fh, off, 4096).unwrap();
            let Some(last) = batch.last() else { break };
            off = last.off;
            pages += 1;
            names.extend(
                batch
                    .iter()
                    .map(|e| String::from_utf8_lossy(&e.name).into_owned()),
            );
        }
        (names, off, pages)
    };
    let (mut names, end, pages) = read_all(&mut c);
    names.sort();
    assert_eq!(names, want, "each entry once");
    assert!(pages >= 5, "{pages} pages");
    // Made after the end was found: this pass may leave it out, but the
    // end must still read as the end, and a rewind must show it.
    std::fs::write(dir.path().join("made-later"), b"").unwrap();
    assert!(c.readdirplus(ROOT_ID, fh, end, 4096).unwrap().len() <= 1);
    let (mut names, _, _) = read_all(&mut c);
    names.sort();
    want.push("made-later".into());
    want.sort();
    assert_eq!(names, want);
    c.releasedir(ROOT_ID, fh).unwrap();
}

/// In the coherent mode the guest may keep a listing it read whole with
/// READDIRPLUS (KEEP_CACHE at the next OPENDIR) while the entries that pass
/// refreshed are inside the window, and never once the host has changed
/// the directory since.
#[test]
fn a_whole_fresh_listing_is_kept_until_the_host_changes_the_directory() {
    const FOPEN_KEEP_CACHE: u32 = 1 << 1;
    const FOPEN_CACHE_DIR: u32 = 1 << 3;
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    for i in 0..60 {
        std::fs::write(sub.join(format!("file-{i}")), b"").unwrap();
    }
    // Older than the slack the daemon allows for the coarse clock.
    let settle = || std::thread::sleep(Duration::from_millis(60));
    settle();
    let mut b = start(dir.path(), &["--coherence-ms=600"]);
    let mut c = client(&mut b);
    let node = c.lookup(ROOT_ID, "sub").unwrap().nodeid;
    let open = |c: &mut FuseClient| {
        let (fh, flags) = c.opendir_flags(node).unwrap();
        assert_ne!(flags & FOPEN_CACHE_DIR, 0, "the guest keeps what it reads");
        (fh, flags & FOPEN_KEEP_CACHE != 0)
    };
    // One page at a time, to the empty reply that ends the listing.
    let pass = |c: &mut FuseClient, fh: u64, plus: bool, until_end: bool| {
        let mut off = 0;
        loop {
            let offs: Vec<u64> = if plus {
                let b = c.readdirplus(node, fh, off, 4096).unwrap();
                b.iter().map(|e| e.off).collect()
            } else {
                let b = c.readdir(node, fh, off, 4096).unwrap();
                b.iter().map(|e| e.0).collect()
            };
            let Some(&last) = offs.last() else { break };
            off = last;
            if !until_end {
                break;
            }
        }
        c.releasedir(node, fh).unwrap();
    };

    let (fh, keep) = open(&mut c);
    assert!(!keep, "nothing read yet");
    pass(&mut c, fh, true, false);
    let (fh, keep) = open(&mut c);
    assert!(
        !keep,
        "a pass that stopped before the end refreshed only part"
    );
    pass(&mut c, fh, false, true);
    let (fh, keep) = open(&mut c);
    assert!(!keep, "READDIR refreshes no entry");
    pass(&mut c, fh, true, true);
    let (fh, keep) = open(&mut c);
    assert!(keep, "a whole READDIRPLUS pass just now");
    c.releasedir(node, fh).unwrap();

    // The host makes an entry: the listing the guest holds is stale.
    std::fs::write(sub.join("made-on-the-host"), b"").unwrap();
    let (fh, keep) = open(&mut c);
    assert!(!keep, "the host changed the directory after the pass");
    settle();
    pass(&mut c, fh, true, true);
    let (fh, keep) = open(&mut c);
    assert!(keep, "a whole pass after the change");
    c.releasedir(node, fh).unwrap();

    // Past three quarters of the window the entries' time is nearly up.
    std::thread::sleep(Duration::from_millis(500));
    let (fh, keep) = open(&mut c);
    assert!(!keep, "the pass is too old");
    c.releasedir(node, fh).unwrap();
}

/// A filesystem mounted inside the share is announced as a submount when
/// asked (`--announce-submounts`), and only then; the share's root never is.
#[test]
fn mounts_inside_the_share_are_announced_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("mnt");
    let Some(_tmpfs) = fs::TmpfsMount::new(&sub) else {
        return;
    };
    std::fs::create_dir(dir.path().join("plain")).unwrap();
    std::fs::write(sub.join("inside"), b"on the tmpfs").unwrap();

    for (flags, announced) in [(&["--announce-submounts"][..], true), (&[][..], false)] {
        let mut b = start(dir.path(), flags);
        let mut c = client(&mut b);
        let m = c.lookup(ROOT_ID, "mnt").unwrap();
        assert_eq!(m.attr.flags & 1 != 0, announced, "{flags:?}");
        assert_eq!(c.lookup(ROOT_ID, "plain").unwrap().attr.flags, 0);
        assert_eq!(c.lookup(ROOT_ID, "..").unwrap().attr.flags, 0);
        // Served across the mount either way.
        let f = c.lookup(m.nodeid, "inside").unwrap();
        assert_eq!(f.attr.size, 12);
        assert_eq!(f.attr.flags, 0);
    }
}

/// A POSIX ACL in the kernel's xattr format (version 2, entries sorted by
/// tag then id): (tag, perm, id).
fn acl_xattr(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// SETXATTR with FUSE_SETXATTR_EXT's header.
fn setxattr_ext(
    c: &mut FuseClient,
    node: u64,
    name: &str,
    value: &[u8],
    setxattr_flags: u32,
) -> Result<Vec<u8>, FsError> {
    let mut a = [0u8; 16];
    a[0..4].copy_from_slice(&(value.len() as u32).to_le_bytes());
    a[8..12].copy_from_slice(&setxattr_flags.to_le_bytes());
    c.call(op::SETXATTR, node, &[&a, &fs::cstr(name), value], 0)
}

/// A host file's extended attribute, if it has it.
fn host_xattr(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 1024];
    // SAFETY: valid C strings; the kernel writes at most buf.len() bytes.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| {
        buf.truncate(r as usize);
        buf
    })
}

fn host_mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn posix_acls_decide_modes_and_drop_the_setgid_bit_when_the_guest_says() {
    const POSIX_ACL: u64 = 1 << 20;
    const DONT_MASK: u64 = 1 << 6;
    const SETXATTR_EXT: u64 = 1 << 29;
    const KILL_SGID: u32 = 1;
    // ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER.
    let (user_obj, user, group_obj, mask, other) = (1u16, 2u16, 4u16, 0x10u16, 0x20u16);
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path();

    // Without --posix-acl the guest is told no, and masks modes itself.
    let mut b = start(share, &["--xattr"]);
    let mut c = FuseClient::connect(&mut b, 8).unwrap();
    c.set_timeout(Duration::from_secs(5));
    let r = c.init_with(POSIX_ACL | DONT_MASK | SETXATTR_EXT).unwrap();
    assert_eq!(r.flags & (POSIX_ACL | DONT_MASK | SETXATTR_EXT), 0);
    drop(c);
    drop(b);

    let mut b = start(share, &["--posix-acl"]);
    let mut c = FuseClient::connect(&mut b, 8).unwrap();
    c.set_timeout(Duration::from_secs(5));
    let r = c
        .init_with(POSIX_ACL | DONT_MASK | SETXATTR_EXT)
        .unwrap_or_else(|e| panic!("INIT: {e}\n{}", b.output()));
    assert_eq!(
        r.flags & (POSIX_ACL | DONT_MASK | SETXATTR_EXT),
        POSIX_ACL | DONT_MASK | SETXATTR_EXT,
        "flags {:#x}",
        r.flags
    );

    // DONT_MASK: the mode comes unmasked with the umask beside it, and
    // with no default ACL on the parent the daemon applies the umask.
    let mkdir = |c: &mut FuseClient, parent: u64, name: &str, mode: u32, umask: u32| {
        let mut a = [0u8; 8];
        a[0..4].copy_from_slice(&mode.to_le_bytes());
        a[4..8].copy_from_slice(&umask.to_le_bytes());
        let body = c
            .call(op::MKDIR, parent, &[&a, &fs::cstr(name)], 128)
            .unwrap();
        u64::from_le_bytes(body[0..8].try_into().unwrap())
    };
    mkdir(&mut c, ROOT_ID, "plain", 0o777, 0o022);
    assert_eq!(host_mode(&share.join("plain")), 0o755);

    // A default ACL on a directory: what is made in it takes its ACL from
    // there, and the umask (077 here) does not apply.
    let inherit = mkdir(&mut c, ROOT_ID, "inherit", 0o777, 0o022);
    let default = acl_xattr(&[
        (user_obj, 7, u32::MAX),
        (user, 7, 4242),
        (group_obj, 5, u32::MAX),
        (mask, 7, u32::MAX),
        (other, 0, u32::MAX),
    ]);
    setxattr_ext(&mut c, inherit, "system.posix_acl_default", &default, 0)
        .unwrap_or_else(|e| panic!("default ACL: {e}\n{}", b.output()));
    let mut a = [0u8; 16];
    a[0..4].copy_from_slice(&(libc::O_WRONLY as u32).to_le_bytes());
    a[4..8].copy_from_slice(&0o666u32.to_le_bytes());
    a[8..12].copy_from_slice(&0o077u32.to_le_bytes());
    c.call(op::CREATE, inherit, &[&a, &fs::cstr("f")], 144)
        .unwrap();
    let made = share.join("inherit/f");
    // group bits = the ACL mask: rwx from the default ACL, cut to rw- by
    // the mode 666.
    assert_eq!(host_mode(&made), 0o660);
    let access = host_xattr(&made, "system.posix_acl_access").expect("the file has an ACL");
    assert!(
        access[4..]
            .chunks(8)
            .any(|e| e[0..2] == user.to_le_bytes() && e[4..8] == 4242u32.to_le_bytes()),
        "user 4242 inherited: {access:?}"
    );
    // The same umask in a directory without a default ACL does apply.
    c.call(op::CREATE, ROOT_ID, &[&a, &fs::cstr("g")], 144)
        .unwrap();
    assert_eq!(host_mode(&share.join("g")), 0o600);

    // Setting an access ACL on a set-group-ID file: the bit stays unless
    // the guest says the caller may not keep it.
    let access = acl_xattr(&[
        (user_obj, 6, u32::MAX),
        (user, 6, 4242),
        (group_obj, 4, u32::MAX),
        (mask, 6, u32::MAX),
        (other, 4, u32::MAX),
    ]);
    for (name, flags, kept) in [("keep", 0, true), ("kill", KILL_SGID, false)] {
        let p = share.join(name);
        std::fs::write(&p, b"x").unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o2664)).unwrap();
        let n = c.lookup(ROOT_ID, name).unwrap().nodeid;
        setxattr_ext(&mut c, n, "system.posix_acl_access", &access, flags).unwrap();
        assert_eq!(
            host_mode(&p) & 0o2000 != 0,
            kept,
            "{name}: mode {:o}",
            host_mode(&p)
        );
        // The ACL itself landed (group bits follow its mask).
        assert_eq!(host_mode(&p) & 0o777, 0o664);
        assert!(host_xattr(&p, "system.posix_acl_access").is_some());
    }

    // Lengths that lie get EINVAL, and the daemon keeps serving.
    let mut a = [0u8; 16];
    a[0..4].copy_from_slice(&100u32.to_le_bytes());
    match c.call(
        op::SETXATTR,
        ROOT_ID,
        &[&a, &fs::cstr("user.x"), b"short"],
        0,
    ) {
        Err(FsError::Errno(e)) => assert_eq!(e, libc::EINVAL),
        other => panic!("expected EINVAL, got {other:?}"),
    }
    match c.call(op::SETXATTR, ROOT_ID, &[&a[..10]], 0) {
        Err(FsError::Errno(e)) => assert_eq!(e, libc::EINVAL),
        other => panic!("expected EINVAL, got {other:?}"),
    }
    setxattr_ext(&mut c, ROOT_ID, "user.ok", b"v", 0).unwrap();
    assert_eq!(host_xattr(share, "user.ok").as_deref(), Some(&b"v"[..]));
}

/// A daemon killed with -9 and started again on the same `--state-file`
/// serves the guest session the dead one had: the node IDs and open file
/// handles the guest holds work, with no new INIT.
#[test]
fn a_restarted_daemon_serves_the_session_the_dead_one_left() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir_all(share.join("dir")).unwrap();
    std::fs::write(share.join("dir/file"), b"kept across the crash").unwrap();
    std::fs::write(share.join("doomed"), b"x").unwrap();
    let state = dir.path().join("fs.state");
    let state_flag = format!("--state-file={}", state.display());

    let mut a = start(&share, &[&state_flag]);
    let mut c = client(&mut a);
    let d = c.lookup(ROOT_ID, "dir").unwrap();
    let f = c.lookup(d.nodeid, "file").unwrap();
    assert_eq!(c.lookup(d.nodeid, "file").unwrap().nodeid, f.nodeid);
    let doomed = c.lookup(ROOT_ID, "doomed").unwrap();
    std::fs::write(share.join("other"), b"o").unwrap();
    let other = c.lookup(ROOT_ID, "other").unwrap();
    let fh = c.open(f.nodeid, libc::O_RDONLY as u32).unwrap();
    let dfh = c.opendir(d.nodeid).unwrap();
    let (n, nfh) = c
        .create(d.nodeid, "new", 0o644, libc::O_WRONLY as u32)
        .unwrap();
    assert_eq!(c.write(n.nodeid, nfh, 0, b"before").unwrap(), 6);
    let gone = c.lookup(ROOT_ID, "dir").unwrap();
    c.forget(gone.nodeid, 1).unwrap();
    drop(c);
    a.kill();
    // While no daemon runs, the host deletes one of the files.
    std::fs::remove_file(share.join("doomed")).unwrap();

    let mut b = start(&share, &[&state_flag]);
    let mut c = FuseClient::connect(&mut b, 8).unwrap();
    c.set_timeout(Duration::from_secs(5));
    // No INIT: the guest's mount carries on. Its first request forgets a
    // node the dead daemon handed out (taken back from the state file to
    // be dropped): the daemon answers the next one.
    c.forget(other.nodeid, 1).unwrap();
    let e = c
        .lookup(ROOT_ID, "other")
        .unwrap_or_else(|e| panic!("after a FORGET of a node left by the dead daemon: {e}"));
    c.forget(e.nodeid, 1).unwrap();
    assert_eq!(
        c.getattr(f.nodeid)
            .unwrap_or_else(|e| panic!("{e}\n{}", b.output()))
            .size,
        21
    );
    assert_eq!(
        c.read(f.nodeid, fh, 0, 4096).unwrap(),
        b"kept across the crash"
    );
    assert_eq!(c.write(n.nodeid, nfh, 6, b" and after").unwrap(), 10);
    assert_eq!(
        std::fs::read(share.join("dir/new")).unwrap(),
        b"before and after"
    );
    let names: Vec<Vec<u8>> = c
        .readdirplus(d.nodeid, dfh, 0, 4096)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&b"file".to_vec()), "{names:?}");
    // The same file keeps its node ID.
    assert_eq!(c.lookup(d.nodeid, "file").unwrap().nodeid, f.nodeid);
    match c.getattr(doomed.nodeid) {
        Err(FsError::Errno(e)) => assert_eq!(e, libc::ESTALE),
        other => panic!("a file deleted meanwhile: {other:?}"),
    }
    c.release(f.nodeid, fh).unwrap();
    c.forget(f.nodeid, 3).unwrap();
    assert!(
        b.output().contains("resuming the guest's session"),
        "{}",
        b.output()
    );

    // A new mount starts a new session: the old IDs mean nothing.
    c.init().unwrap();
    match c.getattr(d.nodeid) {
        Err(FsError::Errno(e)) => assert_eq!(e, libc::EBADF),
        other => panic!("an ID from the old session: {other:?}"),
    }
    drop(c);
    b.kill();

    // Without the state file a restarted daemon cannot know the IDs.
    let mut a = start(&share, &[]);
    let mut c = client(&mut a);
    let d = c.lookup(ROOT_ID, "dir").unwrap();
    drop(c);
    a.kill();
    let mut b = start(&share, &[]);
    let mut c = FuseClient::connect(&mut b, 8).unwrap();
    c.set_timeout(Duration::from_secs(5));
    assert!(c.getattr(d.nodeid).is_err());
}

/// With a pool (`--thread-pool-size`) requests taken together are served
/// on several threads and may finish in any order: each still gets its
/// own reply.
#[test]
fn a_thread_pool_serves_requests_in_flight_together() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = (0..16u8)
        .map(|i| {
            (0..(50_000 + i as usize * 7_001))
                .map(|j| (j as u8) ^ i)
                .collect()
        })
        .collect();
    for (i, data) in files.iter().enumerate() {
        std::fs::write(dir.path().join(format!("f{i}")), data).unwrap();
    }
    let mut b = start(dir.path(), &["--thread-pool-size=4", "--sandbox=none"]);
    let mut c = client(&mut b);
    let mut opened = Vec::new();
    for i in 0..files.len() {
        let e = c.lookup(ROOT_ID, &format!("f{i}")).unwrap();
        let fh = c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
        opened.push((e.nodeid, fh));
    }
    for round in 0..4 {
        // Eight READs in flight at once, then their replies in whatever
        // order they come.
        let mut want = std::collections::HashMap::new();
        for k in 0..8 {
            let i = (round * 8 + k) % files.len();
            let (node, fh) = opened[i];
            let a = FuseClient::read_in(fh, 0, 128 * 1024);
            let (token, unique) = c.push(op::READ, node, &[&a], 128 * 1024).unwrap();
            want.insert(token, (unique, i));
        }
        c.req.publish().unwrap();
        while !want.is_empty() {
            let done = c.req.wait().unwrap();
            let (unique, i) = want
                .remove(&done.token)
                .expect("a reply for a request in flight");
            let body = fs::parse_reply(&done, unique).unwrap();
            let want = &files[i][..files[i].len().min(128 * 1024)];
            assert!(
                body == want,
                "file {i}: {} bytes, {} wanted",
                body.len(),
                want.len()
            );
        }
    }
    // The pool's threads exist (named fs-pool-N).
    let pid = b.pid().expect("running");
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("fs-pool-")).count(),
        4,
        "{names:?}"
    );
    assert!(b.is_running(), "{}", b.output());
}

#[test]
fn the_guest_cannot_leave_the_share() {
    let outer = tempfile::tempdir().unwrap();
    std::fs::write(outer.path().join("secret"), b"outside").unwrap();
    let share = outer.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::create_dir(share.join("sub")).unwrap();
    std::os::unix::fs::symlink(outer.path(), share.join("escape")).unwrap();
    std::os::unix::fs::symlink("../secret", share.join("rel-escape")).unwrap();
    let mut b = start(&share, &[]);
    let mut c = client(&mut b);

    // ".." at the root is the root itself.
    let up = c.lookup(ROOT_ID, "..").unwrap();
    assert_eq!(up.nodeid, ROOT_ID);
    assert!(matches!(
        c.lookup(up.nodeid, "secret"),
        Err(FsError::Errno(libc::ENOENT))
    ));
    // ".." below the root is refused.
    let sub = c.lookup(ROOT_ID, "sub").unwrap();
    assert!(matches!(
        c.lookup(sub.nodeid, ".."),
        Err(FsError::Errno(libc::EACCES))
    ));
    // Names with a slash never reach the host.
    assert!(matches!(
        c.lookup(ROOT_ID, "../secret"),
        Err(FsError::Errno(libc::EINVAL))
    ));
    assert!(matches!(
        c.lookup(ROOT_ID, "sub/../../secret"),
        Err(FsError::Errno(libc::EINVAL))
    ));
    assert!(matches!(
        c.mkdir(ROOT_ID, "..", 0o755),
        Err(FsError::Errno(libc::EINVAL))
    ));
    // A symlink to outside is a symlink: the host never follows it.
    let link = c.lookup(ROOT_ID, "escape").unwrap();
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert!(c.lookup(link.nodeid, "secret").is_err());
    assert!(c.open(link.nodeid, libc::O_RDONLY as u32).is_err());
    assert_eq!(
        c.readlink(link.nodeid).unwrap(),
        outer.path().as_os_str().as_encoded_bytes()
    );
    let rel = c.lookup(ROOT_ID, "rel-escape").unwrap();
    assert!(c.open(rel.nodeid, libc::O_RDONLY as u32).is_err());
    // A file handle that was never opened.
    let f = c.lookup(ROOT_ID, "sub").unwrap();
    assert!(matches!(
        c.read(f.nodeid, 0xdead_beef, 0, 16),
        Err(FsError::Errno(libc::EBADF))
    ));
    // A node id that was never looked up.
    assert!(c.getattr(0x7777_7777).is_err());
    assert!(b.is_running(), "{}", b.output());
}

#[test]
fn malformed_requests_get_errors_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"ok").unwrap();
    let mut b = start(dir.path(), &[]);
    let mut c = client(&mut b);

    // An unknown opcode is answered with ENOSYS.
    assert!(matches!(
        c.call(9999, ROOT_ID, &[], 0),
        Err(FsError::Errno(libc::ENOSYS))
    ));
    // A header whose length claims more than the chain holds.
    let unique = c.next_unique();
    let hdr = hostile::fuse_header_len_lies(op::GETATTR, unique, ROOT_ID, 1 << 20);
    let done = c
        .req
        .call(&[&hdr, &[0u8; 16]], &[256], Shape::DIRECT)
        .unwrap();
    assert!(
        fs::parse_reply(&done, unique).is_err(),
        "a lying length must not succeed"
    );
    // A header cut short.
    let done = c.req.call(&[&[1u8; 10]], &[256], Shape::DIRECT).unwrap();
    assert_eq!(done.len, 0, "nothing to answer a 10-byte request with");
    // Descriptors outside guest memory, loops, bad heads, bad indirect tables.
    let reply = c.dev.mem.alloc_in(1, 4096, 64).unwrap();
    let ring = c.req.ring();
    hostile::readable_outside_memory(ring, 64, Seg::writable(reply, 4096)).unwrap();
    hostile::writable_outside_memory(ring, Seg::readable(reply, 40), 4096).unwrap();
    hostile::looped_chain(ring, reply).unwrap();
    hostile::indirect_table_outside_memory(ring).unwrap();
    hostile::indirect_table_bad_length(ring, reply).unwrap();
    hostile::zero_length(ring, reply, 3).unwrap();
    // Whatever happened to those chains, valid requests are still served.
    for _ in 0..6 {
        let _ = c.req.ring().wait_used(Duration::from_millis(200));
    }
    let e = c.lookup(ROOT_ID, "f").unwrap();
    assert_eq!(e.attr.size, 2);
    assert!(b.is_running(), "daemon died:\n{}", b.output());
}

#[test]
fn serves_again_after_the_frontend_goes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"ok").unwrap();
    let mut b = start(dir.path(), &[]);
    for round in 0..3 {
        let mut c = client(&mut b);
        assert_eq!(
            c.lookup(ROOT_ID, "f").unwrap().attr.size,
            2,
            "round {round}"
        );
        drop(c);
    }
    assert!(b.is_running(), "{}", b.output());
}

#[test]
fn config_space_has_tag_and_queue_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = start(dir.path(), &["--tag=projects", "--request-queues=3"]);
    let mut c = client(&mut b);
    let cfg = c.dev.read_config(0, 40).unwrap();
    assert_eq!(&cfg[..8], b"projects");
    assert!(cfg[8..36].iter().all(|&x| x == 0));
    assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 3);
}

#[test]
fn every_request_queue_serves() {
    use tests::frontend::DeviceOptions;
    use tests::queue::ReqQueue;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"queues").unwrap();
    let mut b = start(dir.path(), &["--request-queues=3"]);
    // hiprio + 3 request queues, as a multi-queue guest sets them up.
    let opts = DeviceOptions {
        queues: 4,
        ..Default::default()
    };
    let mut dev = b
        .device(&opts)
        .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
    let rings = std::mem::take(&mut dev.queues);
    let mut qs: Vec<ReqQueue> = rings
        .into_iter()
        .map(|r| ReqQueue::new(r, &mut dev.mem, 8, 4096, 4096).unwrap())
        .collect();
    let init = {
        let mut a = [0u8; 64];
        a[0..4].copy_from_slice(&7u32.to_le_bytes());
        a[4..8].copy_from_slice(&38u32.to_le_bytes());
        a
    };
    let hdr = fs::in_header(40 + 64, op::INIT, 2, 0);
    let done = qs[1]
        .call(&[&hdr, &init], &[16 + 64], Shape::DIRECT)
        .unwrap();
    fs::parse_reply(&done, 2).unwrap();
    // The same LOOKUP on each request queue, several in flight on each.
    let mut unique = 100;
    for q in qs.iter_mut().skip(1) {
        let mut sent = Vec::new();
        for _ in 0..4 {
            unique += 2;
            let name = fs::cstr("f");
            let hdr = fs::in_header((40 + name.len()) as u32, op::LOOKUP, unique, ROOT_ID);
            sent.push((
                q.push(&[&hdr, &name], &[16 + 128], Shape::DIRECT).unwrap(),
                unique,
            ));
        }
        q.publish().unwrap();
        for _ in 0..4 {
            let c = q.wait().unwrap();
            let u = sent.iter().find(|(t, _)| *t == c.token).unwrap().1;
            let body = fs::parse_reply(&c, u).unwrap();
            let size = u64::from_le_bytes(body[48..56].try_into().unwrap());
            assert_eq!(size, 6);
        }
    }
}

#[test]
fn bad_flags_are_clear_errors() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_virtiofsd-fast"))
        .args([
            "--socket-path=/tmp/unused.sock",
            "--shared-dir=/does/not/exist",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/does/not/exist"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_virtiofsd-fast"))
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"type\": \"fs\""));
}

#[test]
fn namespace_sandbox_confines_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"ok").unwrap();
    let mut b = start(dir.path(), &["--sandbox=namespace"]);
    let mut c = client(&mut b);
    assert_eq!(c.lookup(ROOT_ID, "f").unwrap().attr.size, 2);
    let pid = b.serving_pid().unwrap();
    assert_ne!(
        pid,
        b.pid().unwrap(),
        "the daemon forks into a pid namespace"
    );
    for ns in ["mnt", "net", "pid", "ipc"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(ours, theirs, "{ns} namespace is shared with the host");
    }
    // Its whole filesystem is the share and its own /proc.
    let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    assert_eq!(root, ["proc", "share"]);
    // Capabilities: what a passthrough filesystem needs, and not the rest.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let cap = |key: &str| {
        let l = status.lines().find(|l| l.starts_with(key)).unwrap();
        u64::from_str_radix(l.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    let (eff, bnd) = (cap("CapEff:"), cap("CapBnd:"));
    const SYS_ADMIN: u64 = 1 << 21;
    const NET_ADMIN: u64 = 1 << 12;
    const SYS_PTRACE: u64 = 1 << 19;
    for (name, bit) in [
        ("SYS_ADMIN", SYS_ADMIN),
        ("NET_ADMIN", NET_ADMIN),
        ("SYS_PTRACE", SYS_PTRACE),
    ] {
        assert_eq!(eff & bit, 0, "CAP_{name} is still effective");
        assert_eq!(bnd & bit, 0, "CAP_{name} is still in the bounding set");
    }
    assert_ne!(
        eff & (1 << 2),
        0,
        "CAP_DAC_READ_SEARCH is needed for file handles"
    );
    assert!(b.is_running());
}

#[test]
fn every_sandbox_mode_serves() {
    for mode in ["namespace", "chroot", "none"] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"mode").unwrap();
        let mut b = start(dir.path(), &[&format!("--sandbox={mode}")]);
        let mut c = client(&mut b);
        let e = c.lookup(ROOT_ID, "f").unwrap();
        let fh = c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
        assert_eq!(
            c.read(e.nodeid, fh, 0, 16).unwrap(),
            b"mode",
            "sandbox={mode}"
        );
        let (n, fh) = c
            .create(ROOT_ID, "g", 0o600, libc::O_WRONLY as u32)
            .unwrap();
        c.write(n.nodeid, fh, 0, b"w").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("g")).unwrap(),
            b"w",
            "sandbox={mode}"
        );
        assert!(matches!(c.lookup(ROOT_ID, ".."), Ok(e) if e.nodeid == ROOT_ID));
    }
}

#[test]
fn the_jail_never_shows_through_the_share() {
    // The jail's tmpfs goes on /tmp (or /run): a share of that directory or
    // of / must still show the host's files, not the jail.
    let base = ["/tmp", "/run", "/mnt"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_dir())
        .unwrap();
    let marker = tempfile::Builder::new()
        .prefix("jail-marker")
        .tempfile_in(base)
        .unwrap();
    let name = marker
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    for share in [base, "/"] {
        let mut b = start(std::path::Path::new(share), &["--sandbox=namespace"]);
        let mut c = client(&mut b);
        let dir = if share == "/" {
            c.lookup(ROOT_ID, &base[1..]).unwrap().nodeid
        } else {
            ROOT_ID
        };
        assert!(
            c.lookup(dir, &name).is_ok(),
            "share {share}: the host's {base} is hidden"
        );
        let jail_only = ["proc", "share"].iter().all(|n| c.lookup(dir, n).is_ok());
        assert!(
            !jail_only || std::path::Path::new(base).join("share").exists(),
            "share {share}: the jail shows"
        );
    }
}

/// A tree on disk of `dirs` directories d0.. of `files` files f0.. each,
/// file dD/fF holding "D/F".
fn tree(dirs: usize, files: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    for d in 0..dirs {
        let sub = dir.path().join(format!("d{d}"));
        std::fs::create_dir(&sub).unwrap();
        for f in 0..files {
            std::fs::write(sub.join(format!("f{f}")), format!("{d}/{f}")).unwrap();
        }
    }
    dir
}

/// The daemon on `dir` under `prlimit LIMIT`, with one more flag.
fn start_limited(limit: &str, dir: &std::path::Path, flag: &str) -> BackendProcess {
    let argv = [
        "prlimit".to_string(),
        limit.into(),
        env!("CARGO_BIN_EXE_virtiofsd-fast").to_string(),
        "--fd={fd}".into(),
        format!("--shared-dir={}", dir.display()),
        flag.into(),
    ];
    BackendProcess::spawn(&argv, Duration::from_secs(10)).expect("starts")
}

/// Descriptors the daemon has open now.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_guest_holding_more_files_than_descriptors_allow_is_served() {
    // 3,000 files held by the guest at once, against an open-file limit of
    // 256: the store names them by file handle and keeps descriptors only
    // for the ones in use.
    let dir = tree(30, 100);
    let mut b = start_limited("--nofile=256", dir.path(), "--sandbox=none");
    let pid = b.pid().unwrap();
    let mut c = client(&mut b);
    let mut most = 0;
    for d in 0..30 {
        let sub = c.lookup(ROOT_ID, &format!("d{d}")).unwrap().nodeid;
        for f in 0..100 {
            let e = c
                .lookup(sub, &format!("f{f}"))
                .unwrap_or_else(|e| panic!("d{d}/f{f}: {e}\n{}", b.output()));
            let want = format!("{d}/{f}");
            assert_eq!(c.getattr(e.nodeid).unwrap().size, want.len() as u64);
            let fh = c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
            assert_eq!(c.read(e.nodeid, fh, 0, 64).unwrap(), want.as_bytes());
            c.release(e.nodeid, fh).unwrap();
        }
        most = most.max(open_fds(pid));
    }
    assert!(most < 256, "{most} descriptors open");
    // Every node is still reachable, including the first, long evicted.
    let d0 = c.lookup(ROOT_ID, "d0").unwrap().nodeid;
    let f0 = c.lookup(d0, "f0").unwrap().nodeid;
    let fh = c.open(f0, libc::O_RDONLY as u32).unwrap();
    assert_eq!(c.read(f0, fh, 0, 64).unwrap(), b"0/0");
    eprintln!("at most {most} descriptors open for 3,030 nodes");
}

#[test]
fn mandatory_file_handles_serve_where_the_host_makes_them() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::write(dir.path().join("a"), b"handles").unwrap();
    let mut b = start(dir.path(), &["--inode-file-handles=mandatory"]);
    let mut c = client(&mut b);
    let e = c.lookup(ROOT_ID, "a").unwrap();
    let fh = c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(c.read(e.nodeid, fh, 0, 64).unwrap(), b"handles");
}

/// An unsandboxed daemon (so /proc/PID/fd is the serving process's), its
/// pid, a client, and the node ids of `d0`..`d{n-1}` in the share's root.
fn unsandboxed_with_dirs(
    dir: &std::path::Path,
    n: usize,
) -> (BackendProcess, u32, FuseClient, Vec<u64>) {
    let mut b = start(dir, &["--sandbox=none"]);
    let pid = b.pid().unwrap();
    let mut c = client(&mut b);
    let subs = (0..n)
        .map(|d| c.lookup(ROOT_ID, &format!("d{d}")).unwrap().nodeid)
        .collect();
    (b, pid, c, subs)
}

#[test]
fn released_directories_are_closed_once_the_replies_are_out() {
    // RELEASEDIR's reply does not wait for the host's close of the
    // directory: the daemon closes it when its ring is quiet or before it
    // sleeps. Nothing may stay open for long.
    let dir = tree(40, 20);
    let (_b, pid, mut c, subs) = unsandboxed_with_dirs(dir.path(), 40);
    let before = open_fds(pid);
    for (d, &sub) in subs.iter().enumerate() {
        let fh = c.opendir(sub).unwrap();
        let mut names = 0;
        let mut off = 0;
        loop {
            let batch = c.readdirplus(sub, fh, off, 4096).unwrap();
            let Some(last) = batch.last() else { break };
            off = last.off;
            names += batch.iter().filter(|e| e.name.starts_with(b"f")).count();
        }
        assert_eq!(names, 20, "d{d}");
        c.releasedir(sub, fh).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut now = open_fds(pid);
    while now > before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        now = open_fds(pid);
    }
    assert!(
        now <= before,
        "{now} descriptors open after 40 directories were released, {before} before"
    );
}

#[test]
fn an_open_directory_costs_no_host_descriptor_until_it_is_read() {
    // A guest that lists a directory from its cache opens it and reads
    // nothing: the host open waits for a read (the daemon runs as root
    // here, so it may read any directory).
    let dir = tree(40, 5);
    let (_b, pid, mut c, subs) = unsandboxed_with_dirs(dir.path(), 40);
    let before = open_fds(pid);
    let fhs: Vec<u64> = subs.iter().map(|&s| c.opendir(s).unwrap()).collect();
    let opened = open_fds(pid);
    assert!(
        opened < before + 10,
        "{opened} descriptors with 40 directories open and unread, {before} before"
    );
    // Each reads in full once asked, and a file still cannot be opened
    // as a directory.
    for (d, (&sub, &fh)) in subs.iter().zip(&fhs).enumerate() {
        let names = c
            .readdirplus(sub, fh, 0, 64 * 1024)
            .unwrap()
            .iter()
            .filter(|e| e.name.starts_with(b"f"))
            .count();
        assert_eq!(names, 5, "d{d}");
    }
    let file = c.lookup(subs[0], "f0").unwrap().nodeid;
    assert!(matches!(
        c.opendir(file),
        Err(FsError::Errno(libc::ENOTDIR))
    ));
    // A directory removed on the host between OPENDIR and the read is an
    // error for that read, as after a removal just after a local opendir.
    std::fs::create_dir(dir.path().join("gone")).unwrap();
    let gone = c.lookup(ROOT_ID, "gone").unwrap().nodeid;
    let fh = c.opendir(gone).unwrap();
    std::fs::remove_dir(dir.path().join("gone")).unwrap();
    match c.readdirplus(gone, fh, 0, 4096) {
        Err(FsError::Errno(e)) => assert!([libc::ENOENT, libc::ESTALE].contains(&e), "errno {e}"),
        Err(e) => panic!("{e}"),
        Ok(v) => assert!(v.iter().all(|e| e.name == b"." || e.name == b".."), "{v:?}"),
    }
    c.releasedir(gone, fh).unwrap();
    for (&sub, &fh) in subs.iter().zip(&fhs) {
        c.releasedir(sub, fh).unwrap();
    }
    assert!(c.getattr(ROOT_ID).is_ok());
}

#[test]
fn a_huge_xattr_size_from_the_guest_allocates_no_more_than_linux_returns() {
    // GETXATTR and LISTXATTR name the guest's buffer size; 4 GiB must not
    // become a 4 GiB allocation (under an address-space limit of 2 GiB the
    // daemon would abort).
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = dir.path().join("a");
    std::fs::write(&file, b"x").unwrap();
    let p = std::ffi::CString::new(file.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid C strings and a value buffer of the length given.
    let set = unsafe {
        libc::setxattr(
            p.as_ptr(),
            c"user.t".as_ptr(),
            b"hello".as_ptr().cast(),
            5,
            0,
        )
    };
    if set != 0 {
        backend_common::skip_or_fail("no user xattrs on /var/tmp");
        return;
    }
    let mut b = start_limited("--as=2147483648", dir.path(), "--xattr");
    let mut c = client(&mut b);
    let node = c.lookup(ROOT_ID, "a").unwrap().nodeid;
    let mut size = [0u8; 8];
    size[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let value = c.call(
        op::GETXATTR,
        node,
        &[&size, &fs::cstr("user.t")],
        64 * 1024 + 16,
    );
    assert_eq!(value.as_deref().ok(), Some(&b"hello"[..]), "{}", b.output());
    let names = c
        .call(op::LISTXATTR, node, &[&size], 64 * 1024 + 16)
        .unwrap();
    assert!(names.windows(7).any(|w| w == b"user.t\0"), "{names:?}");
}

#[test]
fn opcodes_fuse_never_used_are_refused_even_with_trace_logging() {
    // 0, 7 and 19 are gaps in FUSE's numbering; with trace logging on,
    // the FUSE layer's log of a request must never see them.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"ok").unwrap();
    let mut b = start(dir.path(), &["--log-level=trace"]);
    let mut c = client(&mut b);
    for opcode in [0, 7, 19, 51, 4096] {
        assert!(
            matches!(
                c.call(opcode, ROOT_ID, &[], 0),
                Err(FsError::Errno(libc::ENOSYS))
            ),
            "opcode {opcode}\n{}",
            b.output()
        );
    }
    let f = c.lookup(ROOT_ID, "f").unwrap();
    assert_eq!(c.getattr(f.nodeid).unwrap().size, 2);
    assert!(b.is_running(), "{}", b.output());
}
