//! Network workloads for `vu-bench`: frames through a tap, either by a
//! plain loop on the tap itself (the physical limit on this host) or through
//! a vhost-user net backend driven by the test frontend.
//!
//! - Transmit: the frontend (or the loop) writes frames into the tap; the
//!   host stack receives them and drops them (they are addressed to another
//!   host), which costs the same for both.
//! - Receive: an injector thread floods the tap from the host side through
//!   an AF_PACKET socket (with a virtio-net header, so 64 KiB TSO frames go
//!   in whole); the frontend (or the loop) takes what arrives. Frames the
//!   tap had no room for are dropped there, as on a real NIC, so the rate
//!   counted is frames delivered.
//!
//! Every frame carries the 12-byte virtio_net_hdr, as on the wire between
//! the backend and the tap.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bench::{closed_loop, Limit, Stats};
use crate::frontend::BackendProcess;
use crate::net::{self, feature, NetClient, NetHdr, HDR_LEN};
use crate::queue::Copy;
use crate::ring::Seg;
use vm_memory::Bytes;

/// Which way frames go, seen from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Tx,
    Rx,
}

/// The guest's MAC on the benchmark NIC, and the host peer's.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xbe, 0x4c, 0x01];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xbe, 0x4c, 0x02];

/// A frame of `len` bytes (Ethernet header included) with its header: UDP
/// up to 1514 bytes, a TCP segment with TSO (gso_size 1448) above.
pub fn frame(len: usize, dst: [u8; 6], src: [u8; 6]) -> (NetHdr, Vec<u8>) {
    let tso = len > 1514;
    let l4 = if tso { 20 } else { 8 };
    // At most 65535 bytes: the kernel passes a TSO frame whole only below
    // the device's gso_max_size (65536), and would have to cut it up.
    let len = len.clamp(14 + 20 + l4, 65_535);
    let ip_len = len - 14;
    let mut ip = vec![0u8; ip_len];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = if tso { 6 } else { 17 };
    ip[12..16].copy_from_slice(&[10, 99, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 99, 0, 2]);
    let sum = ipv4_checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip[20..22].copy_from_slice(&4000u16.to_be_bytes());
    ip[22..24].copy_from_slice(&5000u16.to_be_bytes());
    let hdr = if tso {
        ip[32] = 0x50; // data offset: 5 words
        ip[33] = 0x18; // PSH, ACK
        NetHdr {
            flags: net::F_NEEDS_CSUM,
            gso_type: net::GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    } else {
        ip[24..26].copy_from_slice(&((ip_len - 20) as u16).to_be_bytes());
        NetHdr::default()
    };
    (hdr, net::ethernet_frame(dst, src, 0x0800, &ip))
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sys(what: &str, rc: libc::c_int) -> anyhow::Result<libc::c_int> {
    if rc < 0 {
        anyhow::bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// Bring `tap` up, without IPv6 (whose own traffic would mix in), once it
/// exists (a backend may still be creating it).
pub fn tap_up(tap: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::path::Path::new(&format!("/sys/class/net/{tap}")).exists() {
        anyhow::ensure!(Instant::now() < deadline, "tap {tap} never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
    let st = std::process::Command::new("ip")
        .args(["link", "set", tap, "up"])
        .status()?;
    anyhow::ensure!(st.success(), "ip link set {tap} up failed");
    Ok(())
}

/// Wait (up to 10 s) until no tap named `tap` exists: a backend measured
/// just before may still be letting go of it.
pub fn wait_tap_gone(tap: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/sys/class/net/{tap}")).exists()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Floods the tap from the host side until dropped.
struct Injector {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<u64>>>,
}

impl Injector {
    fn start(tap: &str, frame_len: usize) -> anyhow::Result<Injector> {
        let idx: i32 = std::fs::read_to_string(format!("/sys/class/net/{tap}/ifindex"))?
            .trim()
            .parse()?;
        // SAFETY: plain socket creation; checked.
        let fd = sys("AF_PACKET socket", unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        })?;
        // SAFETY: a fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let on: libc::c_int = 1;
        // SAFETY: setsockopt with an int, on our socket. PACKET_VNET_HDR:
        // every frame sent starts with a virtio_net_hdr (10 bytes: no
        // num_buffers), so TSO frames go in whole.
        sys("PACKET_VNET_HDR", unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                (&on as *const libc::c_int).cast(),
                4,
            )
        })?;
        // SAFETY: as above; skip the qdisc, as a NIC's driver would.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&on as *const libc::c_int).cast(),
                4,
            )
        };
        let (hdr, f) = frame(frame_len, GUEST_MAC, PEER_MAC);
        let mut msg = hdr.encode()[..10].to_vec();
        msg.extend_from_slice(&f);
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            // SAFETY: an all-zero sockaddr_ll is valid; filled below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = idx;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&GUEST_MAC);
            let mut sent = 0u64;
            while !s.load(Ordering::Relaxed) {
                // SAFETY: our buffer and a valid sockaddr_ll.
                let n = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        msg.as_ptr().cast(),
                        msg.len(),
                        0,
                        (&addr as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::ENOBUFS) {
                        anyhow::bail!("injecting into the tap: {e}");
                    }
                    std::thread::yield_now();
                } else {
                    sent += 1;
                }
            }
            Ok(sent)
        });
        Ok(Injector {
            stop,
            thread: Some(thread),
        })
    }

    /// Whether the injector has stopped on its own (an error).
    fn stopped(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    fn finish(mut self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            _ => anyhow::bail!("the injector thread panicked"),
        }
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The physical limit: a plain loop on a tap this process opens, writing
/// (tx) or reading (rx) frames with their header, one syscall per frame,
/// cycling through `buffers` frame buffers (as many as the backend has
/// frames in flight gives both sides the same memory to touch; at 64 KiB
/// frames a single buffer stays in the core's cache and the backend's 128
/// do not).
pub fn raw_tap(
    tap: &str,
    dir: Direction,
    frame_len: usize,
    buffers: usize,
    limit: Limit,
) -> anyhow::Result<Stats> {
    wait_tap_gone(tap);
    let fd = net_backend::link::Tap::open(tap)?.into_fd();
    // Blocking, so the loop sleeps in the kernel as the backend does.
    // SAFETY: F_GETFL/F_SETFL on our descriptor.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
    }
    // The offloads a guest with checksum and TSO offloads takes.
    // SAFETY: TUNSETOFFLOAD takes the flags by value.
    unsafe { libc::ioctl(fd.as_raw_fd(), 0x4004_54d0, 0x07 as libc::c_ulong) };
    tap_up(tap)?;
    let (hdr, f) = frame(frame_len, PEER_MAC, GUEST_MAC);
    let mut msg = hdr.encode().to_vec();
    msg.extend_from_slice(&f);
    let msgs = vec![msg; buffers.max(1)];
    let mut stats = Stats::default();
    let start = Instant::now();
    let deadline = start + limit.duration;
    let mut n = 0u64;
    match dir {
        Direction::Tx => {
            while Instant::now() < deadline && n < limit.max_requests {
                let t = Instant::now();
                write_all(fd.as_raw_fd(), &msgs[n as usize % msgs.len()])?;
                stats.record(t.elapsed(), f.len() as u64);
                n += 1;
            }
        }
        Direction::Rx => {
            let inj = Injector::start(tap, frame_len)?;
            let mut bufs = vec![vec![0u8; 65_600]; buffers.max(1)];
            let mut errors = 0u64;
            let mut last = Instant::now();
            while Instant::now() < deadline && n < limit.max_requests {
                // A bounded wait, so a stalled injector ends the loop.
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd of ours.
                if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                    if inj.stopped() {
                        break;
                    }
                    continue;
                }
                let buf = &mut bufs[n as usize % buffers.max(1)];
                // SAFETY: reading into our buffer.
                let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    if errors == 0 {
                        eprintln!("vu-bench: reading the tap: {e}");
                    }
                    errors += 1;
                    continue;
                }
                let now = Instant::now();
                stats.record(now - last, (r as u64).saturating_sub(HDR_LEN as u64));
                last = now;
                n += 1;
            }
            inj.finish()?;
        }
    }
    stats.set_elapsed(start.elapsed());
    Ok(stats)
}

fn write_all(fd: RawFd, msg: &[u8]) -> anyhow::Result<()> {
    // SAFETY: writing our buffer.
    let n = unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
    anyhow::ensure!(
        n == msg.len() as isize,
        "writing to the tap: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The same frames through a net backend on `tap`: the frontend keeps `qd`
/// frames (tx) or receive buffers (rx) in flight.
pub fn backend(
    proc: &mut BackendProcess,
    tap: &str,
    dir: Direction,
    frame_len: usize,
    qd: usize,
    limit: Limit,
) -> anyhow::Result<Stats> {
    let buf = (frame_len.max(64) + HDR_LEN).next_power_of_two().max(2048) as u32;
    let features = feature::MAC
        | feature::EVENT_IDX
        | feature::CSUM
        | feature::GUEST_CSUM
        | feature::GUEST_TSO4
        | feature::HOST_TSO4;
    let mut c = NetClient::connect(proc, 1, qd.max(1), buf, features)?;
    tap_up(tap)?;
    let shape = c.shape;
    match dir {
        Direction::Tx => {
            // The frames sit in guest memory once, as a guest's would; the
            // driver only recycles descriptors, so the frontend's own
            // copying does not weigh on the backend's number.
            let (hdr, f) = frame(frame_len, PEER_MAC, GUEST_MAC);
            let mut msg = hdr.encode().to_vec();
            msg.extend_from_slice(&f);
            let len = msg.len() as u32;
            let mut bufs = Vec::with_capacity(qd);
            for _ in 0..qd.max(1) {
                let a = c.dev.mem.alloc(u64::from(len), 64)?;
                c.dev.mem.mem().write_slice(&msg, a)?;
                bufs.push(a);
            }
            let ring = c.tx[0].ring();
            let mut in_flight = std::collections::HashMap::with_capacity(qd * 2);
            let mut stats = Stats::default();
            let start = Instant::now();
            let deadline = start + limit.duration;
            let mut issued = 0u64;
            for a in bufs {
                let h = ring.add(&[Seg::readable(a, len)], false)?;
                ring.push_avail(h)?;
                in_flight.insert(h, (a, Instant::now()));
                issued += 1;
            }
            ring.publish()?;
            while !in_flight.is_empty() {
                let u = ring.wait_used(Duration::from_secs(10))?;
                let now = Instant::now();
                let (a, t0) = in_flight
                    .remove(&u.head)
                    .ok_or_else(|| anyhow::anyhow!("used entry {} not in flight", u.head))?;
                stats.record(now - t0, f.len() as u64);
                if now < deadline && issued < limit.max_requests {
                    let h = ring.add(&[Seg::readable(a, len)], false)?;
                    ring.push_avail(h)?;
                    in_flight.insert(h, (a, now));
                    issued += 1;
                    ring.publish()?;
                }
            }
            stats.set_elapsed(start.elapsed());
            Ok(stats)
        }
        Direction::Rx => {
            let inj = Injector::start(tap, frame_len)?;
            let stats = closed_loop(
                &mut c.rx[0],
                qd,
                limit,
                Copy::Prefix(0),
                |q, _| Ok((q.push(&[], &[buf], shape)?, 0)),
                |c, _| Ok(u64::from(c.len).saturating_sub(HDR_LEN as u64)),
            );
            inj.finish()?;
            stats
        }
    }
}
