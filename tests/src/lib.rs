//! Workspace test tooling.
//!
//! - [`frontend`]: spawn or connect to a vhost-user backend and bring a device
//!   up through `vhost::vhost_user::Frontend` on memfd guest memory.
//! - [`ring`] and [`queue`]: a guest-side split-virtqueue driver.
//! - [`fs`], [`blk`], [`net`]: device requests on top (FUSE over virtio-fs,
//!   virtio-blk, virtio-net frames).
//! - [`hostile`]: requests a well-behaved guest never sends.
//! - [`bench`], [`netbench`]: the workloads behind the `vu-bench` binary.

pub mod bench;
pub mod blk;
pub mod frontend;
pub mod fs;
pub mod guest;
pub mod hostile;
pub mod memory;
pub mod nested;
pub mod net;
pub mod netbench;
pub mod queue;
pub mod ring;

pub use frontend::find_program;

/// Say a test was skipped, and why, on stderr itself rather than through
/// `eprintln!`, which the test harness captures: the line shows in every
/// run's output, CI's included.
pub fn skipped(reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}

/// Turns a missing prerequisite into a skip on a developer machine and a
/// failure in CI (where `CI` is set): a test that silently skips in CI would
/// be a test that never runs. A skip prints "skipped: <reason>".
pub fn require<T>(check: Result<T, String>) -> Option<T> {
    match check {
        Ok(v) => Some(v),
        Err(reason) if std::env::var_os("CI").is_some() => {
            panic!("{reason} (CI is set, so a missing prerequisite is a failure, not a skip)")
        }
        Err(reason) => {
            skipped(&reason);
            None
        }
    }
}

/// Find a peer program the tests need, under the rule of [`require`].
pub fn require_program(name: &str, install: &str) -> Option<std::path::PathBuf> {
    require(
        find_program(name).ok_or_else(|| format!("`{name}` not found; install it with: {install}")),
    )
}
