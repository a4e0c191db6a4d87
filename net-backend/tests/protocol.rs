//! net-backend over a real vhost-user connection, driven by the test
//! frontend, with a SOCK_SEQPACKET peer the test scripts: frames both ways,
//! mergeable receive buffers, backpressure, hostile chains, a reconnect,
//! and the sandbox.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use tests::frontend::BackendProcess;
use tests::net::{self, feature, NetClient, NetHdr, HDR_LEN};
use tests::ring::Seg;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];

/// The test's end of the link: a SOCK_SEQPACKET listener.
struct Peer {
    listener: OwnedFd,
    conn: Option<OwnedFd>,
}

fn sys(rc: i32) -> i32 {
    assert!(rc >= 0, "{}", std::io::Error::last_os_error());
    rc
}

impl Peer {
    fn listen(path: &Path) -> Peer {
        // SAFETY: plain socket calls on a fresh descriptor and a zeroed,
        // then filled, sockaddr_un.
        unsafe {
            let fd = sys(libc::socket(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
            ));
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let p = path.to_str().unwrap().as_bytes();
            for (d, s) in addr.sun_path.iter_mut().zip(p) {
                *d = *s as libc::c_char;
            }
            sys(libc::bind(
                fd,
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as u32,
            ));
            sys(libc::listen(fd, 4));
            Peer {
                listener: OwnedFd::from_raw_fd(fd),
                conn: None,
            }
        }
    }
    fn accept(&mut self) {
        // SAFETY: accept on our listener.
        let fd = unsafe {
            sys(libc::accept4(
                self.listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            ))
        };
        // SAFETY: a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setting a receive timeout on our socket.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        self.conn = Some(fd);
    }
    fn send(&self, msg: &[u8]) {
        // SAFETY: sending our buffer on our socket.
        let n = unsafe {
            libc::send(
                self.conn.as_ref().unwrap().as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
            )
        };
        assert_eq!(n, msg.len() as isize, "{}", std::io::Error::last_os_error());
    }
    fn recv(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 70_000];
        // SAFETY: receiving into our buffer.
        let n = unsafe {
            libc::recv(
                self.conn.as_ref().unwrap().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
            )
        };
        assert!(n >= 0, "peer recv: {}", std::io::Error::last_os_error());
        buf.truncate(n as usize);
        buf
    }
}

fn start(dir: &Path, extra: &[&str]) -> (BackendProcess, Peer) {
    let link = dir.join("link.sock");
    let mut peer = Peer::listen(&link);
    let mut argv = vec![
        env!("CARGO_BIN_EXE_net-backend").to_string(),
        "--fd={fd}".into(),
        format!("--socket={}", link.display()),
        "--mac=52:54:00:aa:bb:cc".into(),
        "--mtu=9000".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let b = BackendProcess::spawn(&argv, Duration::from_secs(10)).expect("net-backend starts");
    peer.accept();
    (b, peer)
}

const FEATURES: u64 = feature::MAC
    | feature::MTU
    | feature::STATUS
    | feature::MRG_RXBUF
    | feature::CSUM
    | feature::GUEST_CSUM;

fn client(b: &mut BackendProcess) -> NetClient {
    NetClient::connect(b, 1, 16, 4096, FEATURES).unwrap_or_else(|e| panic!("{e}\n{}", b.output()))
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let payload: Vec<u8> = (0..len - 14)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    net::ethernet_frame([0x52, 0x54, 0, 1, 2, 3], MAC, 0x0800, &payload)
}

#[test]
fn frames_flow_both_ways_with_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, peer) = start(dir.path(), &[]);
    let mut c = client(&mut b);
    let cfg = net::NetConfig::decode(&c.dev.read_config(0, 12).unwrap());
    assert_eq!(cfg.mac, MAC);
    assert_eq!(cfg.status, 1, "link up");
    assert_eq!(cfg.mtu, 9000);
    assert_eq!(cfg.max_virtqueue_pairs, 1);

    // Guest to peer: the header and frame as one message.
    let hdr = NetHdr {
        flags: net::F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    let f = frame(1500, 1);
    c.send(0, hdr, &f).unwrap();
    let got = peer.recv();
    assert_eq!(&got[..HDR_LEN], &hdr.encode());
    assert_eq!(&got[HDR_LEN..], &f[..]);

    // Peer to guest.
    c.post_rx(0, 8, 4096).unwrap();
    let f2 = frame(1000, 2);
    let mut msg = NetHdr::default().encode().to_vec();
    msg.extend_from_slice(&f2);
    peer.send(&msg);
    let (h, data) = c.recv(0).unwrap();
    assert_eq!(h.num_buffers, 1);
    assert_eq!(data, f2);
    assert!(b.is_running(), "{}", b.output());
}

#[test]
fn a_large_frame_spans_several_mergeable_buffers_and_backpressure_holds_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, peer) = start(dir.path(), &[]);
    let mut c = client(&mut b);
    // No receive buffers yet: frames wait in the link, nothing is lost.
    let big = frame(9014, 3);
    let mut msg = NetHdr::default().encode().to_vec();
    msg.extend_from_slice(&big);
    peer.send(&msg);
    let small = frame(60, 4);
    let mut msg2 = NetHdr::default().encode().to_vec();
    msg2.extend_from_slice(&small);
    peer.send(&msg2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.rx[0].in_flight(), 0);
    // Now 4 KiB buffers: the big frame takes three, the small one one.
    c.post_rx(0, 8, 4096).unwrap();
    let mut parts = Vec::new();
    for _ in 0..3 {
        let done = c.rx[0].wait().unwrap();
        parts.push(done.written().to_vec());
    }
    let hdr = NetHdr::decode(&parts[0]).unwrap();
    assert_eq!(hdr.num_buffers, 3);
    let joined: Vec<u8> = parts.concat();
    assert_eq!(&joined[HDR_LEN..], &big[..]);
    let (h, data) = c.recv(0).unwrap();
    assert_eq!(h.num_buffers, 1);
    assert_eq!(data, small);
}

#[test]
fn hostile_chains_are_dropped_and_the_backend_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, peer) = start(dir.path(), &[]);
    let mut c = client(&mut b);
    let buf = c.dev.mem.alloc_in(1, 4096, 64).unwrap();
    // Transmit: a writable buffer, a frame shorter than a header, a buffer
    // outside guest memory; receive: a readable buffer.
    let tx = c.tx[0].ring();
    let h = tx.add(&[Seg::writable(buf, 100)], false).unwrap();
    tx.push_avail(h).unwrap();
    let h = tx.add(&[Seg::readable(buf, 5)], false).unwrap();
    tx.push_avail(h).unwrap();
    let h = tx
        .add(
            &[Seg::readable(
                vm_memory::GuestAddress(tests::memory::UNMAPPED_GPA),
                100,
            )],
            false,
        )
        .unwrap();
    tx.push_avail(h).unwrap();
    tx.publish().unwrap();
    tx.kick_now().unwrap();
    // The driver is told, though no good frame follows them.
    assert!(
        tests::ring::wait_readable(tx.call_fd(), Duration::from_secs(2)).unwrap(),
        "bad chains given back with no interrupt:\n{}",
        b.output()
    );
    let mut back = 0;
    while tx.wait_used(Duration::from_millis(300)).is_ok() {
        back += 1;
    }
    assert_eq!(back, 3, "every bad chain comes back");
    let rx = c.rx[0].ring();
    let h = rx.add(&[Seg::readable(buf, 4096)], false).unwrap();
    rx.push_avail(h).unwrap();
    rx.publish().unwrap();
    rx.kick_now().unwrap();
    peer.send(&[&NetHdr::default().encode()[..], &frame(100, 5)].concat());
    assert_eq!(rx.wait_used(Duration::from_secs(2)).unwrap().len, 0);
    // Good traffic still flows, after a reconnect too.
    assert!(b.is_running(), "{}", b.output());
    drop(c);
    let mut c = client(&mut b);
    c.post_rx(0, 4, 4096).unwrap();
    let (_, data) = c.recv(0).unwrap();
    assert_eq!(data, frame(100, 5), "the frame that waited is delivered");
    c.send(0, NetHdr::default(), &frame(200, 6)).unwrap();
    assert_eq!(&peer.recv()[HDR_LEN..], &frame(200, 6)[..]);
    let warnings = b.output().matches("dropping a chain").count();
    assert!((1..=10).contains(&warnings), "{warnings}");
}

#[test]
fn many_frames_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, peer) = start(dir.path(), &[]);
    let mut c = client(&mut b);
    for i in 0..500u32 {
        c.send(
            0,
            NetHdr::default(),
            &frame(64 + (i as usize % 1400), i as u8),
        )
        .unwrap();
        let got = peer.recv();
        assert_eq!(
            &got[HDR_LEN..],
            &frame(64 + (i as usize % 1400), i as u8)[..]
        );
    }
    for round in 0..10u8 {
        c.post_rx(0, 16, 4096).unwrap();
        for i in 0..16u8 {
            let mut m = NetHdr::default().encode().to_vec();
            m.extend_from_slice(&frame(1514, round ^ i));
            peer.send(&m);
        }
        for i in 0..16u8 {
            let (_, d) = c.recv(0).unwrap();
            assert_eq!(d, frame(1514, round ^ i));
        }
    }
}

#[test]
fn the_sandbox_leaves_only_the_link_and_sockets() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        backend_common::skip_or_fail("the namespace sandbox needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut b, _peer) = start(dir.path(), &[]);
    let _c = client(&mut b);
    let child = b.serving_pid().unwrap();
    assert_ne!(
        child,
        b.pid().unwrap(),
        "the backend forks into a pid namespace"
    );
    for e in std::fs::read_dir(format!("/proc/{child}/fd")).unwrap() {
        let e = e.unwrap();
        let fd: i32 = e.file_name().to_str().unwrap().parse().unwrap();
        // A descriptor closed between the listing and this look is not
        // one the process holds.
        let t = match std::fs::read_link(e.path()) {
            Ok(t) => t.to_string_lossy().into_owned(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => panic!("{}: {err}", e.path().display()),
        };
        assert!(
            fd <= 2
                || t.starts_with("socket:")
                || t.starts_with("anon_inode:")
                || t.starts_with("/memfd:"),
            "fd {fd} -> {t}"
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{child}/status")).unwrap();
    assert!(status
        .lines()
        .any(|l| l.starts_with("CapEff:") && l.ends_with("0000000000000000")));
    assert!(status
        .lines()
        .any(|l| l.starts_with("Seccomp:") && l.ends_with('2')));
    assert_eq!(
        std::fs::read_dir(format!("/proc/{child}/root"))
            .unwrap()
            .count(),
        0
    );
}

/// A net-backend that listens on `link` for its peer.
fn listening(link: &Path) -> BackendProcess {
    listening_as(link, "seqpacket")
}

fn listening_as(link: &Path, kind: &str) -> BackendProcess {
    let argv = [
        env!("CARGO_BIN_EXE_net-backend").to_string(),
        "--fd={fd}".into(),
        format!("--socket-listen={}", link.display()),
        format!("--socket-type={kind}"),
        "--mac=52:54:00:aa:bb:01".into(),
    ];
    let b = BackendProcess::spawn(&argv, Duration::from_secs(10)).expect("net-backend starts");
    // The link socket is bound as the process starts, not before `spawn`
    // returns: a peer started at once may not find it yet.
    if !link.to_string_lossy().starts_with('@') {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !link.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the link socket never appeared:\n{}",
                b.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    b
}

/// A net-backend that connects to the one listening at `link`.
fn connecting(link: &Path) -> BackendProcess {
    connecting_as(link, "seqpacket")
}

fn connecting_as(link: &Path, kind: &str) -> BackendProcess {
    let argv = [
        env!("CARGO_BIN_EXE_net-backend").to_string(),
        "--fd={fd}".into(),
        format!("--socket={}", link.display()),
        format!("--socket-type={kind}"),
        "--mac=52:54:00:aa:bb:02".into(),
    ];
    BackendProcess::spawn(&argv, Duration::from_secs(10)).expect("net-backend starts")
}

/// Frames from `from` until one arrives at `to` (the first ones may be
/// dropped while a datagram peer greets again), then one more that must.
fn crosses_after_replug(from: &mut NetClient, to: &mut NetClient, seed: u8) {
    let f = frame(1200, seed);
    to.rx[0].timeout = Duration::from_millis(300);
    let mut arrived = false;
    for _ in 0..10 {
        from.send(0, NetHdr::default(), &f).unwrap();
        if let Ok((_, got)) = to.recv(0) {
            assert_eq!(got, f);
            arrived = true;
            break;
        }
    }
    assert!(arrived, "no frame got through");
    to.rx[0].timeout = Duration::from_secs(10);
    crosses(from, to, seed.wrapping_add(1));
}

#[test]
fn two_backends_joined_by_a_datagram_socket_pass_frames_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    // A path, then a name in the abstract namespace (which the sandboxed
    // connecting side can reach again after the listener restarts).
    let abstract_name = format!("@vmm-test-dgram-{}", std::process::id());
    for link in [dir.path().join("join.dgram"), abstract_name.into()] {
        let mut a = listening_as(&link, "dgram");
        let mut ca = client(&mut a);
        // No peer yet: dropped, not queued.
        ca.send(0, NetHdr::default(), &frame(100, 9)).unwrap();
        ca.post_rx(0, 16, 4096).unwrap();
        let mut b = connecting_as(&link, "dgram");
        let mut cb = client(&mut b);
        cb.post_rx(0, 16, 4096).unwrap();
        // B greeted A when it started, so A can send first.
        crosses_after_replug(&mut ca, &mut cb, 1);
        for i in 0..5 {
            crosses(&mut cb, &mut ca, 10 + i);
            crosses(&mut ca, &mut cb, 20 + i);
        }
        // A new B: it greets A, which sends to it from then on.
        drop(cb);
        b.kill();
        let mut b = connecting_as(&link, "dgram");
        let mut cb = client(&mut b);
        cb.post_rx(0, 16, 4096).unwrap();
        crosses_after_replug(&mut ca, &mut cb, 30);
        crosses(&mut cb, &mut ca, 40);
        assert!(a.output().contains("a peer wrote"), "{}", a.output());
        if link.to_string_lossy().starts_with('@') {
            // A new A: B's next frame finds it gone, B connects again.
            drop(ca);
            a.kill();
            let mut a = listening_as(&link, "dgram");
            let mut ca = client(&mut a);
            ca.post_rx(0, 16, 4096).unwrap();
            crosses_after_replug(&mut cb, &mut ca, 50);
            crosses(&mut ca, &mut cb, 60);
            assert!(
                b.output().contains("connected to the peer again"),
                "{}",
                b.output()
            );
            assert!(a.is_running(), "{}", a.output());
        }
        assert!(b.is_running(), "{}", b.output());
    }

    // The wrong kind of socket gets an error that says which flag to use.
    let link = dir.path().join("kind.dgram");
    let _a = listening_as(&link, "dgram");
    let err = refused(&[format!("--socket={}", link.display())]);
    assert!(err.contains("--socket-type=dgram"), "{err}");
}

#[test]
fn a_listener_restarted_at_once_waits_for_its_abstract_name() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    // The name is held, as by a killed backend's sandboxed child that has
    // not died yet, and let go a moment after the new listener starts.
    let name = format!("vmm-test-held-{}", std::process::id());
    let held = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    let link = std::path::PathBuf::from(format!("@{name}"));
    let mut a = listening_as(&link, "dgram");
    std::thread::sleep(Duration::from_millis(300));
    drop(held);
    let mut ca = client(&mut a);
    ca.post_rx(0, 16, 4096).unwrap();
    let mut b = connecting_as(&link, "dgram");
    let mut cb = client(&mut b);
    cb.post_rx(0, 16, 4096).unwrap();
    crosses_after_replug(&mut ca, &mut cb, 1);
    crosses(&mut cb, &mut ca, 2);
    assert!(
        a.output().contains("waiting for the previous listener"),
        "{}",
        a.output()
    );

    // A name that stays taken is an error that says so, not a hang.
    let name = format!("{name}-forever");
    let link = std::path::PathBuf::from(format!("@{name}"));
    let held = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    let err = refused(&[
        format!("--socket-listen={}", link.display()),
        "--socket-type=dgram".into(),
    ]);
    drop(held);
    assert!(err.contains("another process still listens there"), "{err}");
}

/// Run net-backend with `args` (and a vhost-user socket of its own): it
/// must refuse to start. Returns what it printed on stderr.
fn refused(args: &[String]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_net-backend"))
        .args([
            "--socket-path",
            dir.path().join("vu.sock").to_str().unwrap(),
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One frame from `from` arrives at `to`, intact.
fn crosses(from: &mut NetClient, to: &mut NetClient, seed: u8) {
    let f = frame(1200, seed);
    from.send(0, NetHdr::default(), &f).unwrap();
    let (_, got) = to.recv(0).unwrap();
    assert_eq!(got, f);
}

#[test]
fn two_backends_joined_by_a_socket_pass_frames_and_survive_a_peer_restart() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("join.sock");
    let mut a = listening(&link);
    // Before any peer: frames from A's guest are dropped, not queued forever.
    let mut ca = client(&mut a);
    ca.send(0, NetHdr::default(), &frame(100, 9)).unwrap();
    ca.post_rx(0, 16, 4096).unwrap();

    let mut b = connecting(&link);
    let mut cb = client(&mut b);
    cb.post_rx(0, 16, 4096).unwrap();
    for i in 0..5 {
        crosses(&mut ca, &mut cb, i);
        crosses(&mut cb, &mut ca, 100 + i);
    }

    // B goes away and a new B connects: A takes the new peer.
    drop(cb);
    b.kill();
    let mut b = connecting(&link);
    let mut cb = client(&mut b);
    cb.post_rx(0, 16, 4096).unwrap();
    crosses(&mut cb, &mut ca, 50);
    crosses(&mut ca, &mut cb, 51);
    assert!(a.is_running(), "{}", a.output());
    assert!(a.output().contains("a peer connected"), "{}", a.output());

    // A connecting backend with nobody listening says what to do.
    let err = refused(&[format!(
        "--socket={}",
        dir.path().join("nobody.sock").display()
    )]);
    assert!(err.contains("--socket-listen"), "{err}");
}
