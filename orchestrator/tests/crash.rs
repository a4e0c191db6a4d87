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

/// A small deterministic random number generator (xorshift), seeded from
/// the clock and printed, so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// The guest's mixed workload, one round per loop until `stop` appears in
/// the share: on the share a file created, fsynced, renamed, and the one
/// from two rounds back deleted, and a line appended to a file held open
/// across every kill; on the disk a 4 KiB O_DIRECT write and a buffered
/// one flushed with fsync, each acknowledged in the share by its md5 once
/// dd says it is done; meanwhile a TCP stream from the host, checked line
/// by line. Anything refused shows as ERR=... (nc's input stays open: on
/// a guest's half-close, Debian 12's passt resends stream data under new
/// sequence numbers, which a pcap of passt's shows.)
const SOAK_SCRIPT: &str = "cd /mnt/host; exec 7>>held.log; \
    sleep 900 | nc 10.0.2.2 PORT | awk 'BEGIN { n = 0 } { if ($0 + 0 != n) { print \"NETBAD=\" n \" got \" $0; exit 1 } n++ } \
        END { print \"NETLINES=\" n }' > /tmp/net & \
    i=0; while [ ! -e stop ]; do i=$((i + 1)); \
      echo \"data $i\" > t.$i || echo ERR=create$i; sync t.$i || echo ERR=fsync$i; \
      mv t.$i f.$i || echo ERR=rename$i; \
      if [ $i -gt 2 ]; then rm f.$((i - 2)) || echo ERR=unlink$i; fi; \
      echo \"line $i\" >&7 || echo ERR=held$i; \
      dd if=/dev/urandom of=/tmp/b bs=4k count=1 2>/dev/null; \
      if dd if=/tmp/b of=/dev/vda bs=4k seek=$i oflag=direct conv=notrunc 2>/dev/null; then \
        echo \"d $i $(md5sum < /tmp/b | cut -c1-32)\" >> disk.acks; else echo ERR=direct$i; fi; \
      dd if=/dev/urandom of=/tmp/c bs=4k count=1 2>/dev/null; \
      if dd if=/tmp/c of=/dev/vda bs=4k seek=$((2048 + i)) conv=notrunc,fsync 2>/dev/null; then \
        echo \"b $i $(md5sum < /tmp/c | cut -c1-32)\" >> disk.acks; else echo ERR=buffered$i; fi; \
      echo ROUND=$i; done; \
    while ! grep -q NETLINES /tmp/net; do sleep 0.2; done; cat /tmp/net; echo DONE=$i";

/// The soak: random SIGKILLs of the share's, the disk's and the NIC's
/// backends at random moments of the mixed workload above, under QEMU.
/// The guest must finish with no error, every write it saw acknowledged
/// must be there (checked from the host), the stream whole, and the VM
/// never stops.
#[test]
fn every_backend_killed_at_random_under_a_mixed_workload() {
    use std::io::Write;
    let Some(ns) = passt_netns("s") else {
        return;
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("soak seed {seed}");
    let mut rng = Rng(seed);
    // The host's end of the stream: numbered lines, a few KiB at a time,
    // until told to stop; how many it sent.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let server = {
        let stop = stop.clone();
        ns.spawn(move || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            port_tx.send(l.local_addr().unwrap().port()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            let started = Instant::now();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut chunk = String::new();
                for _ in 0..256 {
                    chunk.push_str(&format!("{n}\n"));
                    n += 1;
                }
                if let Err(e) = s.write_all(chunk.as_bytes()) {
                    return (n, Some(format!("{e} at {:?}", started.elapsed())));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (n, None)
        })
    };
    let port: u16 = port_rx.recv().unwrap();
    let runtime = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let cfg = dir.path().join("vm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[vm]\nname = \"soak\"\nvmm = \"qemu\"\n[[fs]]\nshared_dir = \"{}\"\ntag = \"host\"\n\
             [[blk]]\nimage = \"{}\"\n[[net]]\nuser = true\n",
            dir.path().display(),
            img.display()
        ),
    )
    .unwrap();
    let script = SOAK_SCRIPT.replace("PORT", &port.to_string());
    let mut c = std::process::Command::new("ip");
    c.args(["netns", "exec", &ns.0, ORCH, "run", "-f"])
        .arg(&cfg)
        .args(["--timeout", "600", "--", &script])
        .env("XDG_RUNTIME_DIR", runtime.path())
        .current_dir(dir.path());
    let (mut vm, out, err) = spawn_piped(c);
    out.wait_for("ROUND=2", 180, &|| err.text());
    let t0 = Instant::now();
    let devices = ["fs0", "blk0", "net0"];
    let mut stalls: Vec<(&str, Duration)> = Vec::new();
    for kill in 1..=12u32 {
        // A random moment: 0.2-2.2 s into the round, at a random device.
        std::thread::sleep(Duration::from_millis(200 + rng.next(2000)));
        let dev = devices[rng.next(devices.len() as u64) as usize];
        eprintln!("{:?}: killing {dev}", t0.elapsed());
        let stall = kill_and_see_progress(runtime.path(), "soak", dev, &out, &err, kill);
        stalls.push((dev, stall));
    }
    std::fs::write(dir.path().join("stop"), b"").unwrap();
    // Let the stream run a moment past the guest's last round, then end it.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, broke) = server.join().unwrap();
    out.wait_for("DONE=", 180, &|| err.text());
    let code = vm.wait().unwrap();
    let (text, log) = (out.text(), err.text());
    let rounds: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("DONE="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!(!text.contains("ERR="), "seed {seed}:\n{text}\n{log}");
    assert!(
        code.success(),
        "seed {seed}: the VM stopped: {code}\n{text}\n{log}"
    );
    // The stream arrived whole and in order.
    assert!(
        broke.is_none(),
        "seed {seed}: the stream broke: {broke:?}\n{text}\n{log}"
    );
    assert!(
        text.contains(&format!("NETLINES={sent}")),
        "seed {seed}: sent {sent} lines\n{text}\n{log}"
    );
    // The share: the last two rounds' files, no earlier one, no temporary
    // name left, and every line the held file was given.
    for i in 1..=rounds {
        let f = dir.path().join(format!("f.{i}"));
        if i + 2 > rounds {
            assert_eq!(std::fs::read_to_string(&f).unwrap(), format!("data {i}\n"));
        } else {
            assert!(!f.exists(), "seed {seed}: f.{i} was deleted in the guest");
        }
        assert!(
            !dir.path().join(format!("t.{i}")).exists(),
            "seed {seed}: t.{i}"
        );
    }
    let held = std::fs::read_to_string(dir.path().join("held.log")).unwrap();
    let want: String = (1..=rounds).map(|i| format!("line {i}\n")).collect();
    assert_eq!(held, want, "seed {seed}: the held file");
    // The disk: every acknowledged write is there.
    let image = std::fs::read(&img).unwrap();
    let acks = std::fs::read_to_string(dir.path().join("disk.acks")).unwrap();
    let mut checked = 0;
    for l in acks.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let i: usize = f[1].parse().unwrap();
        let block = if f[0] == "d" { i } else { 2048 + i };
        let data = &image[block * 4096..(block + 1) * 4096];
        assert_eq!(
            md5_hex(data),
            f[2],
            "seed {seed}: the acknowledged {} write of round {i}",
            if f[0] == "d" { "O_DIRECT" } else { "buffered" }
        );
        checked += 1;
    }
    assert_eq!(checked as u64, rounds * 2, "seed {seed}: acks\n{acks}");
    for dev in devices {
        let mut s: Vec<Duration> = stalls.iter().filter(|x| x.0 == dev).map(|x| x.1).collect();
        s.sort();
        if let Some(m) = s.get(s.len() / 2) {
            eprintln!("soak under QEMU: {dev} killed {} times, median time to the guest's next round {m:?}", s.len());
        }
    }
}

/// md5 of `data` in hex, by the host's md5sum (what the guest's busybox
/// md5sum prints).
fn md5_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut c = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(data).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..32].to_string()
}
