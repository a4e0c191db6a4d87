//! What the daemon's test files share: starting it on a share and bringing
//! up a FUSE session on it.
#![allow(dead_code)]

use std::time::Duration;

use tests::frontend::BackendProcess;
use tests::fs::FuseClient;

/// virtiofsd-fast on `dir`, its socket bound by the test (as a supervisor
/// binds it), with `extra` flags.
pub fn start(dir: &std::path::Path, extra: &[&str]) -> BackendProcess {
    let mut argv = vec![
        env!("CARGO_BIN_EXE_virtiofsd-fast").to_string(),
        "--fd={fd}".into(),
        format!("--shared-dir={}", dir.display()),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    BackendProcess::spawn(&argv, Duration::from_secs(10)).expect("virtiofsd-fast starts")
}

/// A FUSE session (hiprio and one request queue, INIT done) on `b`.
pub fn client(b: &mut BackendProcess) -> FuseClient {
    let mut c = FuseClient::connect(b, 8).unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
    c.set_timeout(Duration::from_secs(5));
    c.init()
        .unwrap_or_else(|e| panic!("INIT: {e}\n{}", b.output()));
    c
}

/// Whether this process may make device nodes (root, as CI runs); a skip
/// elsewhere, a failure under CI.
pub fn can_mknod() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    tests::require(if root {
        Ok(())
    } else {
        Err("making device nodes needs root".to_string())
    })
    .is_some()
}
