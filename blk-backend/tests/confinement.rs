//! What blk-backend reaches and lets others reach: the image never grows
//! past what it is or what the guest was told, and without the namespace
//! sandbox its message shim's private socket has no name anyone else can
//! connect to.

mod common;

use std::collections::HashSet;
use std::path::Path;

use common::{client, image, start};

/// The unix sockets process `pid` holds, as /proc/net/unix names them
/// (inode, path; "@..." for an abstract name).
fn unix_sockets_of(pid: u32) -> Vec<(u64, String)> {
    let inodes: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let target = std::fs::read_link(e.ok()?.path()).ok()?;
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let inode: u64 = f.get(6)?.parse().ok()?;
            inodes
                .contains(&inode)
                .then(|| (inode, f.get(7).unwrap_or(&"").to_string()))
        })
        .collect()
}

#[test]
fn without_the_sandbox_the_shim_socket_has_no_name_to_connect_to() {
    let img = image();
    let mut b = start(img.path(), &["--sandbox=none"]);
    let mut c = client(&mut b, 1, 4);
    c.write(0, &[7u8; 4096]).unwrap();
    let pid = b.pid().unwrap();
    let socks = unix_sockets_of(pid);
    assert!(
        socks.len() >= 3,
        "the listener, the frontend, the shim: {socks:?}"
    );
    for (inode, path) in &socks {
        assert!(
            !path.starts_with('@'),
            "socket {inode} has the abstract name {path}: another process can connect to it"
        );
        if !path.is_empty() && Path::new(path) != b.socket() {
            assert!(
                !Path::new(path).exists(),
                "the shim's socket {path} is still there to connect to"
            );
        }
    }
    assert!(b.is_running(), "{}", b.output());
}

/// The host shrinks the image under a running guest; the backend has not
/// looked at its size since (resize polling off): a write planned against
/// the old size fails instead of growing the file back, and the process
/// cannot write past the capacity the guest was told at all.
#[test]
fn a_write_never_grows_the_image() {
    for engine in ["uring", "threads"] {
        let img = image();
        let mut b = start(
            img.path(),
            &["--resize-poll-ms=0", &format!("--io-engine={engine}")],
        );
        let mut c = client(&mut b, 1, 4);
        let limits =
            std::fs::read_to_string(format!("/proc/{}/limits", b.serving_pid().unwrap())).unwrap();
        let fsize = limits
            .lines()
            .find(|l| l.starts_with("Max file size"))
            .unwrap();
        assert_eq!(
            fsize.split_whitespace().nth(3),
            Some(common::IMAGE.to_string().as_str()),
            "{engine}: {fsize}"
        );
        img.as_file().set_len(32 << 20).unwrap();
        let at_48m = (48 << 20) / 512;
        let r = c.write(at_48m, &[7u8; 4096]);
        assert!(
            r.is_err(),
            "{engine}: a write past the shrunk image's end: {r:?}"
        );
        assert_eq!(
            img.as_file().metadata().unwrap().len(),
            32 << 20,
            "{engine}"
        );
        c.write(0, &[7u8; 4096]).unwrap();
        assert_eq!(c.read(0, 4096).unwrap(), vec![7u8; 4096]);
        assert!(b.is_running(), "{}", b.output());
    }
}
