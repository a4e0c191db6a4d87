//! The test frontend drives a real virtio-fs backend process (virtiofsd, the
//! reference peer) through its own split-ring driver.

use tests::frontend::BackendProcess;
use tests::fs::{FsError, FuseClient, ROOT_ID};
use tests::queue::Shape;

fn virtiofsd(dir: &std::path::Path) -> Option<BackendProcess> {
    let bin = tests::require_program("virtiofsd", "cargo install virtiofsd --locked")?;
    Some(tests::guest::peers::virtiofsd(&bin, dir).expect("virtiofsd serves"))
}

#[test]
fn init_lookup_read_through_own_ring_driver() {
    let dir = tempfile::tempdir().unwrap();
    let token = format!("token-{}", std::process::id());
    std::fs::write(dir.path().join("hello.txt"), &token).unwrap();
    let big: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("big.bin"), &big).unwrap();
    let Some(mut backend) = virtiofsd(dir.path()) else {
        return;
    };

    let mut fuse = FuseClient::connect(&mut backend, 8)
        .unwrap_or_else(|e| panic!("{e}\n{}", backend.output()));
    let init = fuse.init().unwrap();
    assert_eq!(init.major, 7);
    assert!(
        init.minor >= 31,
        "virtio-fs needs FUSE 7.31+, got 7.{}",
        init.minor
    );

    let e = fuse.lookup(ROOT_ID, "hello.txt").unwrap();
    assert_eq!(e.attr.size, token.len() as u64);
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFREG);
    let fh = fuse.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(fuse.read(e.nodeid, fh, 0, 4096).unwrap(), token.as_bytes());
    fuse.release(e.nodeid, fh).unwrap();

    // The same file through indirect descriptors.
    fuse.shape = Shape::INDIRECT;
    let fh = fuse.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(
        fuse.read(e.nodeid, fh, 6, 4096).unwrap(),
        &token.as_bytes()[6..]
    );
    fuse.release(e.nodeid, fh).unwrap();
    fuse.shape = Shape::DIRECT;

    // 1 MiB in 128 KiB reads, compared byte for byte.
    let b = fuse.lookup(ROOT_ID, "big.bin").unwrap();
    let fh = fuse.open(b.nodeid, libc::O_RDONLY as u32).unwrap();
    let mut got = Vec::new();
    while got.len() < big.len() {
        let chunk = fuse
            .read(b.nodeid, fh, got.len() as u64, 128 * 1024)
            .unwrap();
        assert!(!chunk.is_empty(), "short file at {}", got.len());
        got.extend(chunk);
    }
    assert!(got == big, "1 MiB read back differs");
    fuse.release(b.nodeid, fh).unwrap();

    // A missing name is ENOENT, not a hang or a crash.
    assert!(matches!(
        fuse.lookup(ROOT_ID, "nope"),
        Err(FsError::Errno(libc::ENOENT))
    ));

    // READDIRPLUS lists both files with their attributes.
    let mut names: Vec<_> = fuse
        .readdirplus_all(ROOT_ID)
        .unwrap()
        .into_iter()
        .map(|d| {
            (
                String::from_utf8_lossy(&d.name).into_owned(),
                d.entry.attr.size,
            )
        })
        .filter(|(n, _)| n != "." && n != "..")
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            ("big.bin".to_string(), big.len() as u64),
            ("hello.txt".to_string(), token.len() as u64)
        ]
    );

    fuse.forget(e.nodeid, 1).unwrap();
    assert!(
        backend.is_running(),
        "virtiofsd died:\n{}",
        backend.output()
    );
}

#[test]
fn guest_writes_reach_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut backend) = virtiofsd(dir.path()) else {
        return;
    };
    let mut fuse = FuseClient::connect(&mut backend, 4).unwrap();
    fuse.init().unwrap();
    let (e, fh) = fuse
        .create(ROOT_ID, "new.txt", 0o644, libc::O_WRONLY as u32)
        .unwrap();
    assert_eq!(
        fuse.write(e.nodeid, fh, 0, b"written by the guest")
            .unwrap(),
        20
    );
    fuse.release(e.nodeid, fh).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("new.txt")).unwrap(),
        b"written by the guest"
    );
    let d = fuse.mkdir(ROOT_ID, "sub", 0o755).unwrap();
    assert_eq!(d.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    assert!(dir.path().join("sub").is_dir());
    fuse.unlink(ROOT_ID, "new.txt").unwrap();
    assert!(!dir.path().join("new.txt").exists());
}
