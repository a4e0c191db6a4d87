//! net-backend on a stream link (`--socket-type=stream`): frames behind a
//! 4-byte big-endian length and no virtio_net_hdr, the framing of QEMU's
//! `-netdev stream` and of passt. First with a peer the test scripts
//! (framing both ways, frames split across reads, a jumbo frame, a peer
//! that loses step), then with passt itself answering the guest's ARP.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::frontend::BackendProcess;
use tests::net::{self, feature, NetClient, NetHdr};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcd];

/// Everything the device may offer that a stream link cannot carry.
const OFFLOADS: u64 = feature::CSUM
    | feature::GUEST_CSUM
    | feature::GUEST_TSO4
    | feature::GUEST_TSO6
    | feature::HOST_TSO4
    | feature::HOST_TSO6;

fn backend(link: &Path, mtu: u16) -> BackendProcess {
    let argv = [
        env!("CARGO_BIN_EXE_net-backend").to_string(),
        "--fd={fd}".into(),
        format!("--socket={}", link.display()),
        "--socket-type=stream".into(),
        "--mac=52:54:00:aa:bb:cd".into(),
        format!("--mtu={mtu}"),
    ];
    BackendProcess::spawn(&argv, Duration::from_secs(10)).expect("net-backend starts")
}

fn client(b: &mut BackendProcess) -> NetClient {
    NetClient::connect(
        b,
        1,
        16,
        16384,
        feature::MAC | feature::MTU | feature::STATUS | feature::MRG_RXBUF | OFFLOADS,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", b.output()))
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let payload: Vec<u8> = (0..len - 14)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
        .collect();
    net::ethernet_frame(MAC, [0x52, 0x54, 0, 9, 9, 9], 0x0800, &payload)
}

fn framed(f: &[u8]) -> Vec<u8> {
    let mut v = (f.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(f);
    v
}

/// The next frame the peer reads from the stream.
fn read_frame(s: &mut UnixStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("a length from net-backend");
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut f).expect("the frame behind it");
    f
}

#[test]
fn frames_cross_a_stream_link_with_their_length_and_no_header() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&link).unwrap();
    let mut b = backend(&link, 9000);
    let (mut peer, _) = listener.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut c = client(&mut b);
    assert_eq!(
        c.dev.features & OFFLOADS,
        0,
        "offloads offered on a link that cannot carry them"
    );
    let cfg = c.config().unwrap();
    assert_eq!((cfg.status, cfg.mtu), (1, 9000));

    // Guest to peer: length, then the frame, the header gone.
    for (i, len) in [60usize, 1514, 9014].into_iter().enumerate() {
        let f = frame(len, i as u8);
        c.send(0, NetHdr::default(), &f).unwrap();
        assert_eq!(read_frame(&mut peer), f, "frame {i} ({len} bytes)");
    }

    // Peer to guest: two frames in one write, then one split three ways,
    // inside its length and inside its bytes, then a jumbo frame that takes
    // three 4 KiB buffers.
    c.post_rx(0, 12, 4096).unwrap();
    let (f1, f2, f3, f4) = (
        frame(100, 7),
        frame(1514, 8),
        frame(700, 9),
        frame(9014, 10),
    );
    let mut two = framed(&f1);
    two.extend_from_slice(&framed(&f2));
    peer.write_all(&two).unwrap();
    let split = framed(&f3);
    for part in [&split[..2], &split[2..300], &split[300..]] {
        peer.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    peer.write_all(&framed(&f4)).unwrap();
    for (i, want) in [&f1, &f2, &f3].into_iter().enumerate() {
        let (h, got) = c.recv(0).unwrap();
        assert_eq!(
            h,
            NetHdr {
                num_buffers: 1,
                ..Default::default()
            },
            "frame {i}"
        );
        assert_eq!(&got, want, "frame {i}");
    }
    let parts: Vec<Vec<u8>> = (0..3)
        .map(|_| c.rx[0].wait().unwrap().written().to_vec())
        .collect();
    assert_eq!(NetHdr::decode(&parts[0]).unwrap().num_buffers, 3);
    assert_eq!(&parts.concat()[net::HDR_LEN..], &f4[..]);

    // A length no frame has: the stream is out of step, the link goes
    // down, and the device still answers.
    let mut short = 5u32.to_be_bytes().to_vec();
    short.extend_from_slice(&[0u8; 5]);
    peer.write_all(&short).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.config().unwrap().status != 0 {
        assert!(
            Instant::now() < deadline,
            "the link stayed up:\n{}",
            b.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.send(0, NetHdr::default(), &frame(60, 11)).unwrap();
    assert!(b.is_running(), "{}", b.output());
    assert!(b.output().contains("out of step"), "{}", b.output());
}

/// A stream socket holds only a few large frames: a burst larger than it
/// waits for the peer to read instead of being dropped (which would cost
/// the guest's TCP a retransmission at every burst).
#[test]
fn a_burst_larger_than_the_socket_waits_for_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&link).unwrap();
    let mut b = backend(&link, 9000);
    let (mut peer, _) = listener.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut c = client(&mut b);
    const N: usize = 80;
    let reader = std::thread::spawn(move || {
        // Not reading for a while: the socket fills up.
        std::thread::sleep(Duration::from_millis(150));
        (0..N).map(|_| read_frame(&mut peer)).collect::<Vec<_>>()
    });
    let sent: Vec<Vec<u8>> = (0..N).map(|i| frame(9014, i as u8)).collect();
    for f in &sent {
        c.send(0, NetHdr::default(), f).unwrap();
    }
    let got = reader.join().expect("every frame of the burst arrives");
    assert!(got == sent, "frames lost or out of order");
    assert!(b.is_running(), "{}", b.output());
}

/// net-backend's stderr when `args` (and a vhost-user socket of its own)
/// must make it refuse to start.
fn refused(dir: &Path, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_net-backend"))
        .arg("--socket-path")
        .arg(dir.join("vu.sock"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn stream_links_only_connect_and_say_to_what() {
    let dir = tempfile::tempdir().unwrap();
    let l = dir.path().join("l.sock");
    let err = refused(
        dir.path(),
        &[
            "--socket-listen".as_ref(),
            l.as_os_str(),
            "--socket-type=stream".as_ref(),
        ],
    );
    assert!(err.contains("--socket PATH"), "{err}");
    // Nobody listening there (after a second's grace): it says what should.
    let nobody = dir.path().join("nobody.sock");
    let err = refused(
        dir.path(),
        &[
            "--socket".as_ref(),
            nobody.as_os_str(),
            "--socket-type=stream".as_ref(),
        ],
    );
    assert!(err.contains("passt -f -s PATH"), "{err}");
}

/// passt in its own network namespace, serving `socket`.
struct Passt(Child);

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn passt(ns: &net::Netns, socket: &Path) -> Passt {
    // SAFETY: getuid and getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, "passt", "-f", "-q"])
        .arg(format!("--runas={uid}:{gid}"))
        .arg("--socket")
        .arg(socket)
        .args([
            "-a",
            "10.0.2.15",
            "-n",
            "24",
            "-g",
            "10.0.2.2",
            "-m",
            "1500",
        ])
        .args(["-t", "none", "-u", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("passt starts");
    let p = Passt(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "passt never made its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

#[test]
fn passt_answers_the_guests_arp_through_net_backend() {
    let Some(ns) = net::netns_for_passt("st") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("passt.sock");
    let _passt = passt(&ns, &socket);
    let mut b = backend(&socket, 1500);
    let mut c = client(&mut b);
    c.post_rx(0, 8, 4096).unwrap();
    // Who has 10.0.2.2 (passt's gateway)? Tell 10.0.2.15.
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&MAC);
    arp.extend_from_slice(&[10, 0, 2, 15]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 0, 2, 2]);
    let request = net::ethernet_frame([0xff; 6], MAC, 0x0806, &arp);
    c.send(0, NetHdr::default(), &request).unwrap();
    let (h, reply) = c
        .recv(0)
        .unwrap_or_else(|e| panic!("no reply: {e}\n{}", b.output()));
    assert_eq!(h.flags, 0);
    assert_eq!(&reply[..6], &MAC, "to the guest");
    assert_eq!(&reply[12..14], &[0x08, 0x06], "an ARP frame");
    assert_eq!(&reply[20..22], &[0, 2], "a reply");
    assert_eq!(&reply[28..32], &[10, 0, 2, 2], "for the gateway");
    assert_eq!(&reply[32..38], &MAC, "to our MAC");
}
