//! What blk-backend lets others reach: without the namespace sandbox its
//! message shim's private socket has no name anyone else can connect to.

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
