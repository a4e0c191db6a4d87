//! net-backend over real taps, driven by the test frontend: two queue
//! pairs with the control queue (flows spread over both tap queues, and
//! VQ_PAIRS_SET steers them back to one), bad control commands, and a tap
//! deleted under a running backend, a burst of transmitted frames through
//! either transmit engine. Frames enter and leave the tap on the host
//! through AF_PACKET sockets bound to it. These need root.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::frontend::BackendProcess;
use tests::net::{self, feature, NetClient, NetHdr};
use tests::ring::Seg;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcd];
const VIRTIO_NET_OK: u8 = 0;
const VIRTIO_NET_ERR: u8 = 1;

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        tests::require::<()>(Err("a tap needs root".into()));
        return false;
    }
    true
}

fn tap_name(tag: &str) -> String {
    format!("vq{tag}{}", std::process::id() % 100_000)
}

/// Start net-backend on a new tap with `pairs` queue pairs, and bring the
/// tap up once it exists.
fn start(tap: &str, pairs: u16) -> BackendProcess {
    start_with(tap, pairs, &[])
}

fn start_with(tap: &str, pairs: u16, extra: &[&str]) -> BackendProcess {
    let mut argv = vec![
        env!("CARGO_BIN_EXE_net-backend").to_string(),
        "--fd={fd}".into(),
        format!("--tap={tap}"),
        format!("--num-queue-pairs={pairs}"),
        "--mac=52:54:00:aa:bb:cd".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let b = BackendProcess::spawn(&argv, Duration::from_secs(10)).expect("net-backend starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::path::Path::new(&format!("/sys/class/net/{tap}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the tap never appeared:\n{}",
            b.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // No IPv6 on the tap: the host's own neighbour and router messages
    // would land in the receive queues among the test's frames.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
    ip(&["link", "set", tap, "up"]);
    b
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the tap when the test ends, whatever happened.
struct TapGuard(String);
impl Drop for TapGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// An AF_PACKET socket that sends frames out of `ifname` (into the tap).
struct Injector(OwnedFd, i32);

impl Injector {
    fn new(ifname: &str) -> Injector {
        let idx = std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifindex"))
            .unwrap()
            .trim()
            .parse::<i32>()
            .unwrap();
        // SAFETY: plain socket creation; checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor.
        Injector(unsafe { OwnedFd::from_raw_fd(fd) }, idx)
    }

    /// Take the next frame of `ethertype` that left the tap towards the
    /// host (what the backend wrote into it), waiting up to `wait`.
    fn capture(&self, ethertype: u16, wait: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 65_600];
        while Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd of ours.
            if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                continue;
            }
            // SAFETY: reading into our buffer.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 14 && buf[12..14] == ethertype.to_be_bytes() {
                return Some(buf[..n as usize].to_vec());
            }
        }
        None
    }

    /// Listen on the interface only (frames the backend writes into the
    /// tap arrive here as frames the interface received).
    fn bind(&self) {
        // SAFETY: an all-zero sockaddr_ll is valid; filled below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = self.1;
        let big: libc::c_int = 8 << 20;
        // SAFETY: a valid sockaddr_ll and an int option, both ours.
        unsafe {
            assert_eq!(
                libc::bind(
                    self.0.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ),
                0
            );
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&big as *const libc::c_int).cast(),
                4,
            );
        }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: an all-zero sockaddr_ll is valid; filled below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.1;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: our buffer and a valid sockaddr_ll.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

/// A UDP/IPv4 frame to the guest's MAC from source port `port`: a flow of
/// its own, so the tap hashes it to one of its queues.
fn udp_frame(port: u16) -> Vec<u8> {
    let payload = b"multiqueue";
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    let total = (20 + 8 + payload.len()) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let mut udp = Vec::new();
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&9u16.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ip.extend_from_slice(&udp);
    net::ethernet_frame(MAC, [0x52, 0x54, 0, 9, 9, 9], 0x0800, &ip)
}

/// The test's UDP frames (source ports `ports`) that reach each receive
/// queue within `wait`; anything else the host sends is left out.
fn count_rx(c: &mut NetClient, ports: std::ops::Range<u16>, wait: Duration) -> Vec<usize> {
    let mut counts = vec![0; c.rx.len()];
    let deadline = Instant::now() + wait;
    for q in &mut c.rx {
        q.timeout = Duration::from_millis(20);
    }
    while Instant::now() < deadline && counts.iter().sum::<usize>() < ports.len() {
        for (q, n) in counts.iter_mut().enumerate() {
            if let Ok(done) = c.rx[q].wait() {
                let f = &done.written()[net::HDR_LEN..];
                let port = f.get(34..36).map(|p| u16::from_be_bytes([p[0], p[1]]));
                if f.len() == udp_frame(0).len() && port.is_some_and(|p| ports.contains(&p)) {
                    *n += 1;
                }
            }
        }
    }
    counts
}

#[test]
fn two_queue_pairs_carry_flows_and_the_control_queue_steers_them() {
    if !root() {
        return;
    }
    let tap = tap_name("m");
    let _guard = TapGuard(tap.clone());
    let mut b = start(&tap, 2);
    let features = feature::MAC | feature::STATUS | feature::CTRL_VQ | feature::MQ;
    let mut c = NetClient::connect(&mut b, 2, 256, 2048, features)
        .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
    let cfg = c.config().unwrap();
    assert_eq!(cfg.max_virtqueue_pairs, 2);
    assert_eq!(cfg.status, 1);
    let flags = std::fs::read_to_string(format!("/sys/class/net/{tap}/tun_flags")).unwrap();
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    assert_ne!(flags & 0x100, 0, "IFF_MULTI_QUEUE");

    // Bad commands get VIRTIO_NET_ERR and change nothing.
    assert_eq!(
        c.command(4, 0, &3u16.to_le_bytes()).unwrap(),
        VIRTIO_NET_ERR
    );
    assert_eq!(
        c.command(4, 0, &0u16.to_le_bytes()).unwrap(),
        VIRTIO_NET_ERR
    );
    assert_eq!(c.command(4, 0, &[1]).unwrap(), VIRTIO_NET_ERR);
    assert_eq!(c.command(0, 0, &[1]).unwrap(), VIRTIO_NET_ERR);
    assert_eq!(c.command(0x7f, 9, &[]).unwrap(), VIRTIO_NET_ERR);
    // A command with no room for the ack, and one larger than any command:
    // both come back unanswered, and the queue keeps working.
    {
        let buf = c.dev.mem.alloc_in(1, 4096, 64).unwrap();
        let q = c.ctrl.as_mut().unwrap().ring();
        let h = q.add(&[Seg::readable(buf, 4)], false).unwrap();
        q.push_avail(h).unwrap();
        let h = q
            .add(&[Seg::readable(buf, 4000), Seg::writable(buf, 1)], false)
            .unwrap();
        q.push_avail(h).unwrap();
        q.publish().unwrap();
        q.kick_now().unwrap();
        for _ in 0..2 {
            assert_eq!(q.wait_used(Duration::from_secs(2)).unwrap().len, 0);
        }
    }

    // Both pairs in use: 64 flows spread over both tap queues.
    assert_eq!(c.command(4, 0, &2u16.to_le_bytes()).unwrap(), VIRTIO_NET_OK);
    // Buffers for every frame of the test (completions are counted on
    // the ring, so slots are not reused).
    for q in 0..2 {
        c.post_rx(q, 200, 2048).unwrap();
    }
    let inj = Injector::new(&tap);
    for port in 0..64 {
        inj.send(&udp_frame(1000 + port));
    }
    let both = count_rx(&mut c, 1000..1064, Duration::from_secs(5));
    assert_eq!(both.iter().sum::<usize>(), 64, "{both:?}\n{}", b.output());
    assert!(both.iter().all(|&n| n > 0), "{both:?}");

    // Transmit on each pair.
    for q in 0..2 {
        c.send(q, NetHdr::default(), &udp_frame(7)).unwrap();
    }

    // Back to one pair: pair 1's tap queue is detached, so every flow lands
    // on pair 0.
    assert_eq!(c.command(4, 0, &1u16.to_le_bytes()).unwrap(), VIRTIO_NET_OK);
    for port in 0..64 {
        inj.send(&udp_frame(2000 + port));
    }
    let one = count_rx(&mut c, 2000..2064, Duration::from_secs(5));
    assert_eq!(one, vec![64, 0], "{}", b.output());
    // And two again: the queue is attached again.
    assert_eq!(c.command(4, 0, &2u16.to_le_bytes()).unwrap(), VIRTIO_NET_OK);
    for port in 0..64 {
        inj.send(&udp_frame(3000 + port));
    }
    let again = count_rx(&mut c, 3000..3064, Duration::from_secs(5));
    assert_eq!(again.iter().sum::<usize>(), 64, "{again:?}");
    assert!(again.iter().all(|&n| n > 0), "{again:?}\n{}", b.output());
    assert!(b.is_running(), "{}", b.output());

    // The per-pair counters, logged when the frontend goes.
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.output().contains("queue pair counters") {
        assert!(Instant::now() < deadline, "{}", b.output());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = b.output();
    for (p, rx) in [(0, both[0] + 64 + again[0]), (1, both[1] + again[1])] {
        let line = out
            .lines()
            .find(|l| l.contains("queue pair counters") && l.contains(&format!("pair={p} ")))
            .unwrap_or_else(|| panic!("no counters for pair {p}:\n{out}"));
        let field = |k: &str| -> usize {
            line.split(&format!("{k}="))
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        // The host may add frames of its own to the test's.
        assert!(field("rx_frames") >= rx, "{line}");
        assert_eq!(field("tx_frames"), 1, "{line}");
    }
    assert!(out.matches("refusing a control command").count() >= 1);
}

#[test]
fn a_deleted_tap_is_reported_and_the_device_keeps_serving() {
    if !root() {
        return;
    }
    let tap = tap_name("d");
    let _guard = TapGuard(tap.clone());
    let mut b = start(&tap, 1);
    let mut c = NetClient::connect(&mut b, 1, 16, 2048, feature::MAC | feature::STATUS)
        .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
    c.post_rx(0, 8, 2048).unwrap();
    Injector::new(&tap).send(&udp_frame(5));
    let (_, got) = c.recv(0).unwrap();
    assert_eq!(got, udp_frame(5));

    ip(&["link", "del", &tap]);
    // The guest's next frame finds the link gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.output().contains("the link is gone") {
        c.send(0, NetHdr::default(), &udp_frame(6)).unwrap();
        assert!(Instant::now() < deadline, "{}", b.output());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The vhost-user side still answers, and says the link is down.
    assert_eq!(c.config().unwrap().status, 0, "link down");
    for _ in 0..20 {
        c.send(0, NetHdr::default(), &udp_frame(6)).unwrap();
    }
    assert!(b.is_running(), "{}", b.output());
    assert_eq!(b.output().matches("the link is gone").count(), 1);
    // A new frontend is served too.
    drop(c);
    let mut c = NetClient::connect(&mut b, 1, 16, 2048, feature::MAC | feature::STATUS)
        .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
    assert_eq!(c.config().unwrap().status, 0);
    c.send(0, NetHdr::default(), &udp_frame(7)).unwrap();
    assert!(b.is_running(), "{}", b.output());
}

#[test]
fn two_pairs_in_the_sandbox_hold_two_tap_queues_and_nothing_else() {
    if !root() {
        return;
    }
    let tap = tap_name("s");
    let _guard = TapGuard(tap.clone());
    let mut b = start(&tap, 2);
    let _c = NetClient::connect(&mut b, 2, 16, 2048, feature::MAC)
        .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
    let child = b.serving_pid().unwrap();
    let (mut taps, mut rings) = (0, 0);
    for e in std::fs::read_dir(format!("/proc/{child}/fd")).unwrap() {
        let e = e.unwrap();
        let fd: i32 = e.file_name().to_str().unwrap().parse().unwrap();
        // A descriptor closed between the listing and this look (the
        // worker threads' set-up) is not one the process holds.
        let t = match std::fs::read_link(e.path()) {
            Ok(t) => t.to_string_lossy().into_owned(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => panic!("{}: {err}", e.path().display()),
        };
        if t == "/dev/net/tun" {
            taps += 1;
            continue;
        }
        // Each tap queue's transmit ring, which can only write to it.
        if t == "anon_inode:[io_uring]" {
            rings += 1;
            continue;
        }
        assert!(
            fd <= 2
                || t.starts_with("socket:")
                || t.starts_with("anon_inode:")
                || t.starts_with("/memfd:"),
            "fd {fd} -> {t}"
        );
    }
    assert_eq!(taps, 2);
    assert_eq!(rings, if uring().is_ok() { 2 } else { 0 });
}

#[test]
fn oversized_and_nonsense_frames_are_dropped_and_counted() {
    if !root() {
        return;
    }
    let tap = tap_name("b");
    let _guard = TapGuard(tap.clone());
    let mut b = start(&tap, 1);
    let mut c = NetClient::connect(&mut b, 1, 16, 128 << 10, feature::MAC | feature::CSUM)
        .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
    // Larger than any frame (64 KiB + Ethernet + VLAN headers).
    let huge = vec![0x11u8; 70_000];
    c.send(0, NetHdr::default(), &huge).unwrap();
    // Offload fields that make no sense: an unknown GSO type, a checksum
    // start past the frame, a GSO size of zero; the tap refuses them.
    for hdr in [
        NetHdr {
            gso_type: 0x55,
            gso_size: 1400,
            ..Default::default()
        },
        NetHdr {
            flags: net::F_NEEDS_CSUM,
            csum_start: 60_000,
            csum_offset: 6,
            ..Default::default()
        },
        NetHdr {
            gso_type: net::GSO_TCPV4,
            gso_size: 0,
            hdr_len: 54,
            ..Default::default()
        },
    ] {
        c.send(0, hdr, &udp_frame(9)).unwrap();
    }
    // A good frame still goes out, and the device still answers.
    c.send(0, NetHdr::default(), &udp_frame(10)).unwrap();
    assert_eq!(c.config().unwrap().status, 1);
    assert!(b.is_running(), "{}", b.output());
    let out = b.output();
    assert!(
        out.contains("frame too short or too long"),
        "the oversized frame is refused:\n{out}"
    );
    assert_eq!(
        out.matches("frame not sent").count(),
        3,
        "each nonsense header is refused by the tap and counted:\n{out}"
    );
}

/// Whether this kernel gives net-backend its transmit ring.
fn uring() -> std::io::Result<()> {
    let null = std::fs::File::open("/dev/null")?;
    net_backend::uring::TxRing::new(null.as_raw_fd()).map(drop)
}

/// Write syscalls made by process `pid` so far (all its threads).
fn write_syscalls(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    value_of(&io, "syscw:")
}

fn value_of(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

#[test]
fn a_burst_of_transmitted_frames_reaches_the_tap_intact_through_either_engine() {
    if !root() {
        return;
    }
    // A local experimental ethertype: the host stack leaves these alone.
    const ETHERTYPE: u16 = 0x88b5;
    const FRAMES: usize = 200;
    let null = std::fs::File::open("/dev/null").unwrap();
    let mut engines = vec!["writev"];
    match net_backend::uring::TxRing::new(null.as_raw_fd()) {
        Ok(_) => engines.insert(0, "uring"),
        Err(e) => {
            tests::require::<()>(Err(format!(
                "the io_uring engine: this kernel refuses a ring ({e})"
            )));
        }
    }
    for engine in engines {
        let tap = tap_name(&engine[..1]);
        let _guard = TapGuard(tap.clone());
        let mut b = start_with(&tap, 1, &[&format!("--tx-engine={engine}")]);
        let mut c = NetClient::connect(&mut b, 1, 256, 2048, feature::MAC)
            .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
        let pid = b.serving_pid().unwrap();
        let rings = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .filter(|t| t.to_string_lossy() == "anon_inode:[io_uring]")
            .count();
        assert_eq!(
            rings,
            usize::from(engine == "uring"),
            "{engine}: io_uring descriptors"
        );
        let cap = Injector::new(&tap);
        cap.bind();
        // Frames of many sizes, each numbered, queued all at once so the
        // backend finds a long run of them on the ring.
        let frames: Vec<Vec<u8>> = (0..FRAMES)
            .map(|i| {
                let len = 46 + (i * 97) % 1400;
                let mut payload: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8).collect();
                payload[..2].copy_from_slice(&(i as u16).to_be_bytes());
                net::ethernet_frame([0x02, 0, 0, 0, 0, 0x99], MAC, ETHERTYPE, &payload)
            })
            .collect();
        let hdr = NetHdr::default().encode();
        let writes = write_syscalls(pid);
        for f in &frames {
            c.tx[0].push(&[&hdr, f], &[], c.shape).unwrap();
        }
        c.tx[0].publish().unwrap();
        for _ in 0..FRAMES {
            c.tx[0]
                .wait()
                .unwrap_or_else(|e| panic!("{e}\n{}", b.output()));
        }
        let writes = write_syscalls(pid) - writes;
        for (i, f) in frames.iter().enumerate() {
            let got = cap
                .capture(ETHERTYPE, Duration::from_secs(5))
                .unwrap_or_else(|| panic!("{engine}: frame {i} never left the tap"));
            assert_eq!(&got, f, "{engine}: frame {i} arrives whole and in order");
        }
        // writev costs a syscall per frame; the ring takes a run of frames
        // per io_uring_enter, which is not a write syscall (what is left
        // are the used-ring notifications, one eventfd write per batch).
        if engine == "uring" {
            assert!(
                writes < FRAMES as u64 / 2,
                "{engine}: {writes} write syscalls for {FRAMES} frames"
            );
            assert!(b
                .output()
                .contains("transmitting in batches through io_uring"));
        } else {
            assert!(
                writes >= FRAMES as u64,
                "{engine}: {writes} write syscalls for {FRAMES} frames"
            );
        }
        assert!(b.is_running(), "{}", b.output());
    }
}
