//! Backends killed again and again under a running guest: each is
//! restarted, the guest never stops making progress, and nothing it saw
//! acknowledged is lost.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Kill `dev` of VM `name` with -9, wait until its supervisor has started
/// it again, then until the guest has finished another round of its loop
/// (its `ROUND=n` lines); returns the time from the kill to that round.
fn kill_and_see_progress(
    runtime: &std::path::Path,
    name: &str,
    dev: &str,
    out: &Lines,
    err: &Lines,
    kill: u32,
) -> Duration {
    let round = |text: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("ROUND="))
            .filter_map(|n| n.parse().ok())
            .max()
            .unwrap_or(0)
    };
    let (pid, restarts) = device_now(runtime, name, dev);
    let pid = pid.unwrap_or_else(|| panic!("{dev} runs"));
    // Let it serve past the supervisor's healthy mark (1 s), as a backend
    // killed now and then does: each restart then comes at once.
    std::thread::sleep(Duration::from_millis(1200));
    // SAFETY: killing the backend the orchestrator started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let at = round(&out.text());
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(120);
    loop {
        let (now, n) = device_now(runtime, name, dev);
        if n > restarts && now.is_some_and(|p| p != pid) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kill {kill}: {dev} was not restarted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    while round(&out.text()) < at + 1 {
        if Instant::now() >= deadline {
            let log = find_file(runtime, &format!("{dev}.log"))
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            panic!(
                "kill {kill} of {dev}: the guest made no progress for 120 s (round {at})\n\
                 --- guest ---\n{}\n--- orchestrator ---\n{}\n--- {dev}.log (end) ---\n{}",
                out.text(),
                err.text(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let stall = killed.elapsed();
    eprintln!("kill {kill} of {dev}: the guest finished its next round {stall:?} after the kill");
    stall
}

/// The guest copies 64 KiB of fresh random data into the share, syncs,
/// and compares, over and over, while the host kills the share's backend
/// ten times; every round must compare equal and the guest must finish.
#[test]
fn a_share_backend_killed_ten_times_under_guest_io() {
    if !backends_built() {
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = share_and_disk_vm(dir.path(), "fskills", 16);
    let script = "cd /mnt/host; i=0; while [ ! -e stop ]; do i=$((i + 1)); \
        dd if=/dev/urandom of=/tmp/a bs=64k count=1 2>/dev/null; \
        cp /tmp/a f$((i % 4)) || echo CPFAIL=$i; sync; \
        cmp /tmp/a f$((i % 4)) || echo BAD=$i; echo ROUND=$i; done; echo DONE=$i";
    let (mut child, out, err) = run_in_guest(runtime.path(), dir.path(), &cfg, script);
    out.wait_for("ROUND=2", 120, &|| err.text());
    let mut stalls: Vec<Duration> = (1..=10)
        .map(|kill| kill_and_see_progress(runtime.path(), "fskills", "fs0", &out, &err, kill))
        .collect();
    stalls.sort();
    eprintln!(
        "fs0 under QEMU: from a kill to the guest's next finished round: median {:?}, max {:?}",
        stalls[stalls.len() / 2],
        stalls[stalls.len() - 1]
    );
    std::fs::write(dir.path().join("stop"), b"").unwrap();
    out.wait_for("DONE=", 120, &|| err.text());
    let code = child.wait().unwrap();
    let text = out.text();
    assert!(
        !text.contains("BAD=") && !text.contains("CPFAIL="),
        "{text}\n{}",
        err.text()
    );
    assert!(code.success(), "{text}\n{}", err.text());
}
