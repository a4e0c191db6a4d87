//! Workspace test tooling.
//!
//! - [`frontend`]: spawn or connect to a vhost-user backend and bring a device
//!   up through `vhost::vhost_user::Frontend` on memfd guest memory.
//! - [`ring`] and [`queue`]: a guest-side split-virtqueue driver.
//! - [`fs`], [`blk`], [`net`]: device requests on top (FUSE over virtio-fs,
//!   virtio-blk, virtio-net frames).
//! - [`hostile`]: requests a well-behaved guest never sends.
//! - [`bench`]: the workloads behind the `vu-bench` binary.

pub mod bench;
pub mod blk;
pub mod frontend;
pub mod hostile;
pub mod net;
pub mod memory;
pub mod queue;
pub mod ring;
pub mod fs;
pub mod guest;

use std::path::PathBuf;

/// Find a peer program the tests need. Outside CI a missing peer makes the
/// caller skip (it prints why, and the test is not a pass in spirit: the
/// line says "skipped"); under CI (`CI` set) a missing peer is a failure,
/// because `.ci/run` is supposed to have installed it.
pub fn require_program(name: &str, install: &str) -> Option<PathBuf> {
    if let Some(p) = frontend::find_program(name) {
        return Some(p);
    }
    let msg = format!("`{name}` not found; install it with: {install}");
    if std::env::var_os("CI").is_some() {
        panic!("{msg} (.ci/run should have)");
    }
    eprintln!("skipped: {msg}");
    None
}
