//! The command lines libvirt and Kata generate for virtiofsd start
//! virtiofsd-fast, which then serves the share as they asked.

mod common;

use std::time::Duration;

use common::client;
use tests::frontend::BackendProcess;
use tests::fs::ROOT_ID;

fn serves(argv: &[String]) -> BackendProcess {
    let mut full = vec![env!("CARGO_BIN_EXE_virtiofsd-fast").to_string()];
    full.extend_from_slice(argv);
    let mut b = BackendProcess::spawn(&full, Duration::from_secs(10)).expect("starts");
    let mut c = client(&mut b);
    let e = c
        .lookup(ROOT_ID, "f")
        .unwrap_or_else(|e| panic!("{argv:?}: {e}\n{}", b.output()));
    let fh = c.open(e.nodeid, libc::O_RDONLY as u32).unwrap();
    assert_eq!(c.read(e.nodeid, fh, 0, 16).unwrap(), b"compat");
    b
}

/// libvirt's qemuVirtioFSBuildCommandLine: `--fd=N -o source=DIR,cache=..,
/// sandbox=..,xattr,no_flock,no_posix_lock --thread-pool-size=N -d`, with
/// commas in the path doubled.
#[test]
fn libvirts_command_line_serves() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("vm,share");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("f"), b"compat").unwrap();
    let source = dir.display().to_string().replace(',', ",,");
    let argv = [
        "--fd={fd}".to_string(),
        "-o".into(),
        format!("source={source},cache=always,sandbox=chroot,xattr,no_flock,no_posix_lock"),
        "--thread-pool-size=4".into(),
        "-d".into(),
    ];
    let b = serves(&argv);
    assert!(b.output().contains("DEBUG"), "-d: {}", b.output());
}

/// Kata's virtiofsd arguments: --syslog, --cache, --shared-dir, --fd and
/// its default extra arguments.
#[test]
fn katas_command_line_serves() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"compat").unwrap();
    let argv = [
        "--syslog".to_string(),
        "--cache=auto".into(),
        format!("--shared-dir={}", dir.path().display()),
        "--fd={fd}".into(),
        "--thread-pool-size=1".into(),
        "--announce-submounts".into(),
    ];
    let b = serves(&argv);
    // The log went to the system log, or (no syslog daemon here) stderr
    // says why it did not.
    let out = b.output();
    assert!(
        !out.contains("serving") || out.contains("no system log"),
        "{out}"
    );
}

#[test]
fn an_option_that_would_mislead_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_virtiofsd-fast"))
        .args(["--socket-path=/tmp/unused.sock", "-o"])
        .arg(format!("source={},flock", dir.path().display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("-o flock") && err.contains("no_flock"),
        "{err}"
    );
}
