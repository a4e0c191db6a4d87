//! Peer backends a guest test starts next to QEMU: virtiofsd and
//! qemu-storage-daemon, each as a [`BackendProcess`] on a socket the test
//! binds itself and passes by descriptor, so QEMU can connect at once.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use crate::frontend::{BackendProcess, FrontendError};

/// Starts virtiofsd sharing `dir` (cache=auto, no sandbox: tests may run
/// unprivileged).
pub fn virtiofsd(binary: &Path, dir: &Path) -> Result<BackendProcess, FrontendError> {
    let argv = [
        binary.to_string_lossy().into_owned(),
        "--fd={fd}".into(),
        format!("--shared-dir={}", dir.display()),
        "--cache=auto".into(),
        "--sandbox=none".into(),
    ];
    BackendProcess::spawn(&argv, Duration::from_secs(20))
}

/// Starts qemu-storage-daemon exporting the raw file `image` as vhost-user-blk.
pub fn storage_daemon(binary: &Path, image: &Path) -> Result<BackendProcess, FrontendError> {
    let mut blockdev = OsString::from("driver=file,node-name=f,filename=");
    blockdev.push(escape_commas(image));
    let argv = [
        binary.to_string_lossy().into_owned(),
        "--blockdev".into(),
        blockdev.to_string_lossy().into_owned(),
        "--export".into(),
        "type=vhost-user-blk,id=e,node-name=f,writable=on,addr.type=fd,addr.str={fd}".into(),
    ];
    BackendProcess::spawn(&argv, Duration::from_secs(20))
}

pub use orchestrator::qemu::escape_commas;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_are_doubled() {
        assert_eq!(escape_commas(Path::new("/a,b/c")), "/a,,b/c");
    }
}
