//! A real Linux guest under QEMU (-netdev vhost-user) on a NIC served by
//! net-backend over a tap. The tap is moved into a network namespace the
//! test creates, and the host side of every exchange lives there: the guest
//! pings it and moves 64 MiB each way over TCP (HTTP through busybox wget),
//! checked by MD5 on both sides.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::frontend::BackendProcess;
use tests::guest::{self, Qemu};
use tests::net::Netns;

const SIZE: usize = 64 << 20;

/// The value a guest script printed as `KEY=value` (`key` includes the
/// `=`); a missing one fails the test with the output and `also()`.
fn value(out: &str, key: &str, also: &dyn Fn() -> String) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}\n{}", also()))
        .trim()
        .to_string()
}

fn data() -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn md5(bytes: &[u8]) -> String {
    let mut c = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// An HTTP server for `requests` requests: POST stores the body, GET
/// sends `data`.
fn serve_http(listener: TcpListener, data: Vec<u8>, requests: usize) -> Vec<u8> {
    let mut posted = Vec::new();
    for _ in 0..requests {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut request = String::new();
        r.read_line(&mut request).unwrap();
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut w = s;
        if request.starts_with("POST") {
            posted = vec![0u8; length];
            r.read_exact(&mut posted).unwrap();
            w.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        } else {
            write!(
                w,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                data.len()
            )
            .unwrap();
            w.write_all(&data).unwrap();
        }
    }
    posted
}

/// net-backend on a new tap with `pairs` queue pairs, the tap moved into a
/// new network namespace as 10.77.0.1/24. None (with the reason printed)
/// where that cannot be done here.
fn backend_on_tap_in_netns(tag: &str, pairs: u16) -> Option<(Netns, BackendProcess)> {
    tests::require(guest::qemu_available())?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        tests::require::<()>(Err("a tap and a network namespace need root".into()));
        return None;
    }
    let id = std::process::id() % 100_000;
    let Some(ns) = Netns::new(&format!("vmm{tag}{id}")) else {
        tests::require::<()>(Err(
            "`ip netns add` failed (apt-get install iproute2)".into()
        ));
        return None;
    };
    let tap = format!("vm{tag}{id}");
    let argv = [
        env!("CARGO_BIN_EXE_net-backend").to_string(),
        "--fd={fd}".into(),
        format!("--tap={tap}"),
        format!("--num-queue-pairs={pairs}"),
    ];
    let b = BackendProcess::spawn(&argv, Duration::from_secs(10)).expect("net-backend starts");
    // The socket is bound by the test, so the backend may still be opening
    // its tap: wait for the device to appear.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !Path::new(&format!("/sys/class/net/{tap}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the tap never appeared:\n{}",
            b.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new("ip")
        .args(["link", "set", &tap, "netns", &ns.0])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "moving the tap into the namespace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ns.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", &tap]);
    ns.exec(&["ip", "link", "set", &tap, "up"]);
    ns.exec(&["ip", "link", "set", "lo", "up"]);

    Some((ns, b))
}

#[test]
fn a_guest_on_a_tap_pings_and_moves_64_mib_each_way() {
    let Some((ns, b)) = backend_on_tap_in_netns("t", 1) else {
        return;
    };
    let sent = data();
    let want_down = md5(&sent);
    let server = {
        let sent = sent.clone();
        ns.spawn(move || {
            let l = TcpListener::bind("10.77.0.1:8080").unwrap();
            serve_http(l, sent, 2)
        })
    };
    let script = "ping -c 3 -W 5 10.77.0.1 && echo PING=ok; \
        dd if=/dev/urandom bs=1M count=48 2>/dev/null | base64 > /tmp/up; \
        echo \"UP=$(md5sum /tmp/up | cut -d' ' -f1)\"; \
        echo \"UPSIZE=$(wc -c < /tmp/up)\"; \
        T0=$(cut -d' ' -f1 /proc/uptime); \
        wget -q --post-file=/tmp/up -O /dev/null http://10.77.0.1:8080/up && echo POST=ok; \
        T1=$(cut -d' ' -f1 /proc/uptime); \
        wget -q -O /tmp/down http://10.77.0.1:8080/down && echo GET=ok; \
        T2=$(cut -d' ' -f1 /proc/uptime); \
        echo \"SECONDS_UP=$(echo $T0 $T1 | awk '{print $2-$1}')\"; \
        echo \"SECONDS_DOWN=$(echo $T1 $T2 | awk '{print $2-$1}')\"; \
        echo \"DOWN=$(md5sum /tmp/down | cut -d' ' -f1)\"";
    let run = match Qemu::new()
        .memory_mib(1024)
        .net(b.socket())
        .kernel_arg("testbed.ip=10.77.0.2/24")
        .run(script, Duration::from_secs(600))
    {
        Ok(r) => r,
        Err(e) => panic!("{e}\n--- net-backend ---\n{}", b.output()),
    };
    let out = run.script_output();
    let line = |k: &str| value(&out, k, &|| format!("--- net-backend ---\n{}", b.output()));
    assert_eq!(line("PING="), "ok");
    assert_eq!(line("POST="), "ok");
    assert_eq!(line("GET="), "ok");
    let posted = server.join().unwrap();
    // busybox wget posts a file as text, so the guest sends 48 MiB of
    // random bytes in base64: 64 MiB and a bit.
    assert_eq!(posted.len().to_string(), line("UPSIZE="));
    assert!(posted.len() >= SIZE, "{}", posted.len());
    assert_eq!(md5(&posted), line("UP="), "guest to host");
    assert_eq!(line("DOWN="), want_down, "host to guest");
    // For the record (BENCHMARKS.md), not a check: TCP through the guest's
    // NIC, which under TCG is bound by the emulated CPU.
    let secs = |k: &str| line(k).parse::<f64>().unwrap_or(0.0).max(0.01);
    println!(
        "guest TCP over net-backend: guest to host {:.0} MB/s, host to guest {:.0} MB/s",
        posted.len() as f64 / secs("SECONDS_UP=") / 1e6,
        SIZE as f64 / secs("SECONDS_DOWN=") / 1e6
    );
}

/// The `queue pair counters` line net-backend logs for pair `p` when its
/// frontend goes: (rx_frames, tx_frames).
fn pair_counters(log: &str, p: usize) -> Option<(u64, u64)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("queue pair counters") && l.contains(&format!("pair={p} ")))?;
    let field = |k: &str| -> Option<u64> {
        let v = line.split(&format!("{k}=")).nth(1)?;
        v.split_whitespace().next()?.parse().ok()
    };
    Some((field("rx_frames")?, field("tx_frames")?))
}

#[test]
fn a_two_vcpu_guest_uses_both_queue_pairs() {
    let Some((ns, mut b)) = backend_on_tap_in_netns("q", 2) else {
        return;
    };
    let sent: Vec<u8> = data().into_iter().take(8 << 20).collect();
    let want = md5(&sent);
    let server = ns.spawn(move || {
        let l = TcpListener::bind("10.77.0.1:8080").unwrap();
        serve_http(l, sent, 2)
    });
    // One download pinned to each vCPU: the guest transmits each flow on
    // its CPU's queue (XPS), and the tap answers on the queue it came from.
    let script = "ping -c 2 -W 5 10.77.0.1 && echo PING=ok; \
        taskset 1 wget -q -O /tmp/d0 http://10.77.0.1:8080/a & \
        taskset 2 wget -q -O /tmp/d1 http://10.77.0.1:8080/b & \
        wait; \
        echo \"D0=$(md5sum /tmp/d0 | cut -d' ' -f1)\"; \
        echo \"D1=$(md5sum /tmp/d1 | cut -d' ' -f1)\"; \
        echo \"QUEUES=$(ls /sys/class/net/eth0/queues | tr '\\n' ' ')\"";
    let run = match Qemu::new()
        .memory_mib(512)
        .cpus(2)
        .net_queues(b.socket(), "52:54:00:12:34:56", 2)
        .kernel_arg("testbed.ip=10.77.0.2/24")
        .run(script, Duration::from_secs(600))
    {
        Ok(r) => r,
        Err(e) => panic!("{e}\n--- net-backend ---\n{}", b.output()),
    };
    let out = run.script_output();
    let line = |k: &str| value(&out, k, &|| format!("--- net-backend ---\n{}", b.output()));
    assert_eq!(line("PING="), "ok");
    assert_eq!(line("D0="), want);
    assert_eq!(line("D1="), want);
    assert!(line("QUEUES=").contains("rx-1"), "{out}");
    server.join().unwrap();
    // QEMU has gone: the backend logs what each pair moved.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pair_counters(&b.output(), 1).is_none() {
        assert!(std::time::Instant::now() < deadline, "{}", b.output());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = b.output();
    for p in 0..2 {
        let (rx, tx) = pair_counters(&log, p).unwrap();
        assert!(rx > 20 && tx > 20, "pair {p}: rx {rx} tx {tx}\n{log}");
    }
    assert!(b.is_running(), "{log}");
}

#[test]
fn two_guests_joined_by_a_socket_ping_each_other_and_move_data() {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("join.sock");
    let spawn = |link_flag: String, mac: &str| {
        let argv = [
            env!("CARGO_BIN_EXE_net-backend").to_string(),
            "--fd={fd}".into(),
            link_flag,
            format!("--mac={mac}"),
        ];
        BackendProcess::spawn(&argv, Duration::from_secs(10)).expect("net-backend starts")
    };
    let a = spawn(
        format!("--socket-listen={}", link.display()),
        "52:54:00:00:00:0a",
    );
    let b = spawn(format!("--socket={}", link.display()), "52:54:00:00:00:0b");
    // A serves a file over HTTP and stays up until B has gone; B pings A,
    // fetches the file, and both print its MD5.
    let script_a = "mkdir -p /www && dd if=/dev/urandom of=/www/f bs=1M count=16 2>/dev/null; \
        echo \"SUM=$(md5sum /www/f | cut -d' ' -f1)\"; \
        httpd -p 8080 -h /www; \
        for i in $(seq 300); do ping -c 1 -W 1 10.78.0.2 >/dev/null && { echo PEER=up; break; }; done; \
        while ping -c 1 -W 2 10.78.0.2 >/dev/null; do sleep 1; done; echo PEER=gone";
    let script_b = "for i in $(seq 300); do ping -c 1 -W 1 10.78.0.1 >/dev/null && break; done; \
        ping -c 3 -W 5 10.78.0.1 && echo PING=ok; \
        for i in $(seq 30); do wget -q -O /tmp/f http://10.78.0.1:8080/f && break; sleep 1; done; \
        echo \"SUM=$(md5sum /tmp/f | cut -d' ' -f1)\"";
    let guest = |socket: &Path, mac: &str, ip: &str| {
        Qemu::new()
            .memory_mib(512)
            .net_with_mac(socket, mac)
            .kernel_arg(format!("testbed.ip={ip}/24"))
    };
    let mut runs = Qemu::run_together(
        vec![
            (
                guest(a.socket(), "52:54:00:00:00:0a", "10.78.0.1"),
                script_a.to_string(),
            ),
            (
                guest(b.socket(), "52:54:00:00:00:0b", "10.78.0.2"),
                script_b.to_string(),
            ),
        ],
        Duration::from_secs(600),
    );
    let (rb, ra) = (runs.pop().unwrap(), runs.pop().unwrap());
    let logs = || {
        format!(
            "--- backend A ---\n{}\n--- backend B ---\n{}",
            a.output(),
            b.output()
        )
    };
    let (ra, rb) = match (ra, rb) {
        (Ok(ra), Ok(rb)) => (ra, rb),
        (ra, rb) => panic!("A: {:?}\nB: {:?}\n{}", ra.err(), rb.err(), logs()),
    };
    let (out_a, out_b) = (ra.script_output(), rb.script_output());
    let line = |out: &str, k: &str| value(out, k, &logs);
    assert_eq!(line(&out_b, "PING="), "ok");
    assert_eq!(line(&out_a, "PEER="), "up");
    assert_eq!(
        line(&out_a, "SUM="),
        line(&out_b, "SUM="),
        "the file crossed intact"
    );
    assert_eq!(line(&out_a, "SUM=").len(), 32);
}
