//! pjdfstest, the POSIX filesystem test suite, inside a real Linux guest on
//! a virtio-fs mount, for virtiofsd-fast and virtiofsd in the same run:
//! virtiofsd-fast must fail no test that virtiofsd passes.
//!
//! The suite's binary and its shared libraries reach the guest through a
//! second virtio-fs share, so the guest image stays as it is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::frontend::BackendProcess;
use tests::guest::{self, Qemu};

const CONFIG: &str = r#"
[features]
posix_fallocate = {}
[settings]
naptime = 0.01
allow_remount = false
[dummy_auth]
entries = [["nobody", "nogroup"], ["tests", "tests"]]
"#;

/// The guest's users for the suite's credential switches, then the run.
const SCRIPT: &str = r#"
set -e
printf 'root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\ntests:x:1000:1000::/:/bin/false\n' > /etc/passwd
printf 'root:x:0:\nnogroup:x:65534:\ntests:x:1000:\n' > /etc/group
mkdir -p /mnt/host /tools
mount -t virtiofs share /mnt/host
mount -t virtiofs tools /tools
mkdir -p /mnt/host/pjd && chmod 755 /mnt/host/pjd
cd /mnt/host/pjd
set +e
NO_COLOR=1 TERM=dumb /tools/ld-linux-x86-64.so.2 --library-path /tools /tools/pjdfstest -c /tools/pjdfstest.toml -p /mnt/host/pjd 2>&1
echo "pjdfstest-exit: $?"
exit 0
"#;

/// Copy the suite and the shared libraries it needs (per ldd) into `dir`.
fn tools_dir(bin: &Path, dir: &Path) {
    std::fs::copy(bin, dir.join("pjdfstest")).unwrap();
    std::fs::write(dir.join("pjdfstest.toml"), CONFIG).unwrap();
    let ldd = Command::new("ldd").arg(bin).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line.split_whitespace().find(|w| w.starts_with('/'));
        if let Some(p) = path {
            let p = PathBuf::from(p);
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    assert!(
        dir.join("ld-linux-x86-64.so.2").exists(),
        "no dynamic loader found by ldd"
    );
}

/// Run the suite on a share served by `argv` (`{fd}` and `{dir}` filled in).
fn run_suite(name: &str, argv: &[String], tools: &Path) -> BTreeMap<String, String> {
    let share = tempfile::tempdir().unwrap();
    let fill = |a: &String| a.replace("{dir}", &share.path().to_string_lossy());
    let fs_argv: Vec<String> = argv.iter().map(fill).collect();
    let fs = BackendProcess::spawn(&fs_argv, Duration::from_secs(20)).unwrap();
    let tools_argv = vec![
        env!("CARGO_BIN_EXE_virtiofsd-fast").to_string(),
        "--fd={fd}".into(),
        format!("--shared-dir={}", tools.display()),
        "--tag=tools".into(),
    ];
    let tools_fs = BackendProcess::spawn(&tools_argv, Duration::from_secs(20)).unwrap();
    let run = Qemu::new()
        .fs(fs.socket(), "share")
        .fs(tools_fs.socket(), "tools")
        .run(SCRIPT, Duration::from_secs(1800))
        .unwrap_or_else(|e| panic!("{name}: {e}\n--- daemon ---\n{}", fs.output()));
    assert_eq!(run.exit_code, 0, "{name}: {}", run.serial);
    let out = strip_ansi(&run.script_output());
    assert!(
        out.contains("Summary:"),
        "{name}: pjdfstest did not finish:\n{out}"
    );
    let mut results = BTreeMap::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        if let (Some(test), Some(verdict), None) = (words.next(), words.next(), words.next()) {
            if test.contains("::") && matches!(verdict, "ok" | "FAILED" | "skipped") {
                results.insert(test.to_string(), verdict.to_string());
            }
        }
    }
    let summary = out
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_default();
    eprintln!("pjdfstest on {name}: {summary}");
    assert!(
        results.len() > 300,
        "{name}: only {} results parsed:\n{out}",
        results.len()
    );
    results
}

/// The suite colours its verdicts; the parser wants plain words. The
/// escape byte itself may not survive the serial console, so "[1;31m" is
/// dropped with or without it.
fn strip_ansi(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let start = if b[i] == 0x1b { i + 1 } else { i };
        if b.get(start) == Some(&b'[') {
            let mut j = start + 1;
            while j < b.len() && (b[j].is_ascii_digit() || b[j] == b';') {
                j += 1;
            }
            if b.get(j) == Some(&b'm') {
                i = j + 1;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn fails_nothing_that_virtiofsd_passes() {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    let Some(suite) = tests::require_program("pjdfstest", "cargo install pjdfstest --locked")
    else {
        return;
    };
    let Some(virtiofsd) = tests::require_program("virtiofsd", "cargo install virtiofsd --locked")
    else {
        return;
    };
    let tools = tempfile::tempdir().unwrap();
    tools_dir(&suite, tools.path());

    let ours = run_suite(
        "virtiofsd-fast",
        &[
            env!("CARGO_BIN_EXE_virtiofsd-fast").into(),
            "--fd={fd}".into(),
            "--shared-dir={dir}".into(),
        ],
        tools.path(),
    );
    // With POSIX ACLs the daemon applies the guest's umask itself
    // (DONT_MASK): the suite's creation-mode tests check it does so right.
    let acl = run_suite(
        "virtiofsd-fast --posix-acl",
        &[
            env!("CARGO_BIN_EXE_virtiofsd-fast").into(),
            "--fd={fd}".into(),
            "--shared-dir={dir}".into(),
            "--posix-acl".into(),
        ],
        tools.path(),
    );
    let peer = run_suite(
        "virtiofsd",
        &[
            virtiofsd.to_string_lossy().into_owned(),
            "--fd={fd}".into(),
            "--shared-dir={dir}".into(),
        ],
        tools.path(),
    );
    let count = |r: &BTreeMap<String, String>, v: &str| r.values().filter(|x| *x == v).count();
    for (name, r) in [
        ("virtiofsd-fast", &ours),
        ("virtiofsd-fast --posix-acl", &acl),
        ("virtiofsd", &peer),
    ] {
        eprintln!(
            "{name}: {} passed, {} failed, {} skipped",
            count(r, "ok"),
            count(r, "FAILED"),
            count(r, "skipped")
        );
    }
    let worse: Vec<String> = [("", &ours), (" (--posix-acl)", &acl)]
        .iter()
        .flat_map(|(how, r)| {
            r.iter()
                .filter(|(t, v)| *v == "FAILED" && peer.get(*t).map(String::as_str) == Some("ok"))
                .map(move |(t, _)| format!("{t}{how}"))
        })
        .collect();
    assert!(
        worse.is_empty(),
        "virtiofsd-fast fails what virtiofsd passes: {worse:#?}"
    );
    let failed: Vec<&String> = ours
        .iter()
        .filter(|(_, v)| *v == "FAILED")
        .map(|(t, _)| t)
        .collect();
    eprintln!("virtiofsd-fast failures (virtiofsd fails them too): {failed:?}");
}
