//! A vhost-user relay that keeps QEMU's vhost-user devices across backend
//! restarts.
//!
//! QEMU 7.2 has no reconnect for vhost-user-fs: when the backend's socket
//! hangs up, the device is dead for the rest of the VM's life. For disks
//! and NICs it reconnects, but polls for the new backend once a second
//! (`reconnect=1`, its finest setting), so the guest waits a second per
//! restart. So under QEMU the orchestrator puts this relay between QEMU
//! and every backend. QEMU talks to the relay, which forwards every
//! message (and its descriptors) to the backend and every reply back, and
//! keeps what set the device up: features, the memory table, the inflight
//! area, each running ring. When the backend dies the relay connects to its
//! successor at once (the socket path is the orchestrator's, so the
//! connection waits in its backlog until the new process serves), replays
//! that state with each ring's base read from its used index in guest
//! memory, and, once the backend has answered, kicks the rings and raises
//! their interrupts, so requests the guest made meanwhile are served. QEMU
//! never sees the hang-up. The data path does not pass through here:
//! kicks, interrupts and guest memory go between QEMU and the backend as
//! before. With `--state-file` the new virtiofsd-fast also knows the
//! guest's node IDs and open files, so the mount carries on; a restarted
//! blk-backend finds in the inflight area what its predecessor left.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backend_common::vu_msg::{read_message as recv, write_message as send, Message as Msg, HDR};

const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

// Front-end requests (vhost-user spec).
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const RESET_OWNER: u32 = 4;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const SET_BACKEND_REQ_FD: u32 = 21;
const GET_CONFIG: u32 = 24;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const RESET_DEVICE: u32 = 34;
const GET_MAX_MEM_SLOTS: u32 = 36;
const GET_STATUS: u32 = 40;
/// Protocol features the relay takes out of the backend's offer: with
/// CONFIGURE_MEM_SLOTS QEMU would send memory regions one by one. The
/// inflight area (INFLIGHT_SHMFD) passes: QEMU gives it to the backend
/// with SET_INFLIGHT_FD, which the relay keeps and hands each successor,
/// so a restarted disk backend finds what its predecessor left in flight.
const MASKED_PROTOCOL: u64 = 1 << 15;

/// How long the relay waits for a dead backend's successor.
const RECONNECT_WAIT: Duration = Duration::from_secs(60);

/// What the relay needs to know of a message beyond its framing.
trait MsgExt: Sized {
    fn wants_reply(&self) -> bool;
    fn u32_at(&self, at: usize) -> Option<u32>;
    fn u64_at(&self, at: usize) -> Option<u64>;
    fn ring(&self) -> Option<u32>;
    fn dup(&self) -> io::Result<Self>;
    fn request_only(request: u32) -> Self;
}

impl MsgExt for Msg {
    /// A request whose answer the front end waits for.
    fn wants_reply(&self) -> bool {
        matches!(
            self.request(),
            GET_FEATURES
                | GET_PROTOCOL_FEATURES
                | GET_VRING_BASE
                | GET_QUEUE_NUM
                | GET_CONFIG
                | GET_INFLIGHT_FD
                | GET_MAX_MEM_SLOTS
                | GET_STATUS
        ) || self.flags() & FLAG_NEED_REPLY != 0
    }
    fn u32_at(&self, at: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            self.body.get(at..at + 4)?.try_into().ok()?,
        ))
    }
    fn u64_at(&self, at: usize) -> Option<u64> {
        Some(u64::from_le_bytes(
            self.body.get(at..at + 8)?.try_into().ok()?,
        ))
    }
    /// The ring a ring message names.
    fn ring(&self) -> Option<u32> {
        match self.request() {
            SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
                self.u64_at(0).map(|v| (v & 0xff) as u32)
            }
            _ => self.u32_at(0),
        }
    }
    fn dup(&self) -> io::Result<Msg> {
        Ok(Msg {
            hdr: self.hdr,
            body: self.body.clone(),
            fds: self
                .fds
                .iter()
                .map(|f| f.try_clone())
                .collect::<io::Result<_>>()?,
        })
    }
    fn request_only(request: u32) -> Msg {
        let mut hdr = [0u8; HDR];
        hdr[0..4].copy_from_slice(&request.to_le_bytes());
        hdr[4..8].copy_from_slice(&1u32.to_le_bytes());
        Msg {
            hdr,
            body: Vec::new(),
            fds: Vec::new(),
        }
    }
}

/// Guest memory as the memory table describes it, mapped read-only for
/// the rings' used indexes.
struct Memory {
    regions: Vec<(u64, u64, *const u8)>, // (front-end address, size, mapping)
}

// SAFETY: the mappings are only read, through volatile loads.
unsafe impl Send for Memory {}

impl Memory {
    fn map(table: &Msg) -> Option<Memory> {
        let n = table.u32_at(0)? as usize;
        let mut regions = Vec::new();
        for (i, fd) in table.fds.iter().enumerate().take(n) {
            let at = 8 + i * 32;
            let (size, user, offset) = (
                table.u64_at(at + 8)?,
                table.u64_at(at + 16)?,
                table.u64_at(at + 24)?,
            );
            // SAFETY: a new read-only shared mapping of a descriptor QEMU
            // sent; checked below, unmapped in Drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size as usize,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return None;
            }
            regions.push((user, size, p as *const u8));
        }
        Some(Memory { regions })
    }

    /// The 16-bit word at front-end address `addr`.
    fn u16_at(&self, addr: u64) -> Option<u16> {
        let &(user, _, p) = self.regions.iter().find(|&&(user, size, _)| {
            addr >= user && addr.checked_add(2).is_some_and(|end| end - user <= size)
        })?;
        // SAFETY: inside a live mapping, as the find above checked.
        Some(unsafe { std::ptr::read_volatile(p.add((addr - user) as usize) as *const u16) })
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        for &(_, size, p) in &self.regions {
            // SAFETY: mappings made in `map`, unmapped once.
            unsafe { libc::munmap(p as *mut libc::c_void, size as usize) };
        }
    }
}

/// What set the device up, as the front end last said it.
#[derive(Default)]
struct Setup {
    device: BTreeMap<u32, Msg>,
    rings: BTreeMap<(u32, u32), Msg>,
    memory: Option<Memory>,
}

impl Setup {
    fn record(&mut self, m: &Msg) -> io::Result<()> {
        match m.request() {
            SET_OWNER
            | SET_FEATURES
            | SET_PROTOCOL_FEATURES
            | SET_BACKEND_REQ_FD
            | SET_INFLIGHT_FD => {
                self.device.insert(m.request(), m.dup()?);
            }
            SET_MEM_TABLE => {
                self.memory = Memory::map(m);
                self.device.insert(SET_MEM_TABLE, m.dup()?);
            }
            SET_VRING_NUM | SET_VRING_ADDR | SET_VRING_BASE | SET_VRING_KICK | SET_VRING_CALL
            | SET_VRING_ERR | SET_VRING_ENABLE => {
                if let Some(ring) = m.ring() {
                    self.rings.insert((ring, m.request()), m.dup()?);
                }
            }
            // A stopped ring is set up afresh before it runs again.
            GET_VRING_BASE => {
                if let Some(ring) = m.ring() {
                    self.rings.retain(|&(r, _), _| r != ring);
                }
            }
            RESET_OWNER | RESET_DEVICE => {
                self.rings.clear();
                // A reset device starts with a fresh inflight area.
                self.device.remove(&SET_INFLIGHT_FD);
            }
            _ => {}
        }
        Ok(())
    }

    /// Where ring `ring` has got to: its used index in guest memory.
    fn used_index(&self, ring: u32) -> Option<u16> {
        let addr = self.rings.get(&(ring, SET_VRING_ADDR))?;
        // vhost_vring_addr: index, flags, desc, used, avail, log.
        let used = addr.u64_at(16)?;
        self.memory.as_ref()?.u16_at(used + 2)
    }

    /// Bring a new backend to where its predecessor was.
    fn replay(&self, b: &UnixStream) -> io::Result<()> {
        let ask = |request: u32| -> io::Result<()> {
            send(b, &Msg::request_only(request))?;
            recv(b)?.ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            Ok(())
        };
        let say = |m: &Msg| -> io::Result<()> {
            send(b, m)?;
            if m.flags() & FLAG_NEED_REPLY != 0 {
                recv(b)?.ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            }
            Ok(())
        };
        ask(GET_FEATURES)?;
        if self.device.contains_key(&SET_PROTOCOL_FEATURES) {
            ask(GET_PROTOCOL_FEATURES)?;
        }
        for request in [
            SET_PROTOCOL_FEATURES,
            SET_OWNER,
            SET_BACKEND_REQ_FD,
            SET_FEATURES,
            SET_MEM_TABLE,
            SET_INFLIGHT_FD,
        ] {
            if let Some(m) = self.device.get(&request) {
                say(m)?;
            }
        }
        let rings: Vec<u32> = self.rings.keys().map(|&(r, _)| r).collect();
        let mut done = Vec::new();
        for ring in rings {
            if done.contains(&ring) {
                continue;
            }
            done.push(ring);
            for request in [
                SET_VRING_NUM,
                SET_VRING_ADDR,
                SET_VRING_BASE,
                SET_VRING_KICK,
                SET_VRING_CALL,
                SET_VRING_ERR,
                SET_VRING_ENABLE,
            ] {
                let Some(m) = self.rings.get(&(ring, request)) else {
                    continue;
                };
                if request == SET_VRING_BASE {
                    // Go on from what the dead backend finished: anything
                    // it took and did not answer is taken again.
                    let mut m = m.dup()?;
                    if let (Some(used), Some(num)) = (self.used_index(ring), m.body.get_mut(4..8)) {
                        num.copy_from_slice(&u32::from(used).to_le_bytes());
                    }
                    say(&m)?;
                } else {
                    say(m)?;
                }
            }
        }
        // One answered request after the replay: the backend handles its
        // messages in order, so once this is answered every ring is
        // enabled. A kick that arrives before its ring's SET_VRING_ENABLE
        // is consumed and dropped by the library, and the requests behind
        // it would wait for a kick that never comes.
        ask(GET_FEATURES)?;
        for ring in done {
            // Requests made while no backend was there were kicked into
            // the void: kick once more. And the dead backend may have
            // returned buffers without interrupting the guest: a spare
            // interrupt makes the guest look at its used ring.
            for request in [SET_VRING_KICK, SET_VRING_CALL] {
                if let Some(fd) = self.rings.get(&(ring, request)).and_then(|m| m.fds.first()) {
                    let one = 1u64.to_ne_bytes();
                    // SAFETY: an eventfd write of 8 bytes from a buffer we own.
                    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
                }
            }
        }
        Ok(())
    }
}

/// Take the front end's connections on `front` and relay each to the
/// backend at `backend`, for as long as the listener lives. `name` labels
/// the log lines.
pub fn serve(name: &str, front: &UnixListener, backend: &Path) {
    for q in front.incoming() {
        let Ok(q) = q else { continue };
        if let Err(e) = relay(name, &q, backend) {
            eprintln!("orchestrator: {name} relay: {e}; the VMM's connection is closed");
        }
    }
}

/// [`serve`] on a thread of its own.
pub fn spawn(name: String, front: UnixListener, backend: PathBuf) -> io::Result<()> {
    std::thread::Builder::new()
        .name(format!("relay-{name}"))
        .spawn(move || serve(&name, &front, &backend))?;
    Ok(())
}

fn connect(backend: &Path, wait: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + wait;
    loop {
        match UnixStream::connect(backend) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn relay(name: &str, q: &UnixStream, backend: &Path) -> io::Result<()> {
    let mut b = connect(backend, RECONNECT_WAIT)?;
    let mut setup = Setup::default();
    // A request sent to a backend that died before it answered.
    let mut pending: Option<Msg> = None;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: q.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: b.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            let Some(m) = recv(q)? else {
                return Ok(()); // the VMM went away
            };
            setup.record(&m)?;
            if m.wants_reply() {
                pending = Some(m.dup()?);
            }
            if send(&b, &m).is_err() {
                b = reconnect(name, backend, &setup, &mut pending)?;
            }
            continue;
        }
        if fds[1].revents != 0 {
            match recv(&b) {
                Ok(Some(mut m)) => {
                    if m.flags() & FLAG_REPLY != 0 {
                        pending = None;
                    }
                    if m.request() == GET_PROTOCOL_FEATURES {
                        if let Some(f) = m.u64_at(0) {
                            m.body[0..8].copy_from_slice(&(f & !MASKED_PROTOCOL).to_le_bytes());
                        }
                    }
                    send(q, &m)?;
                }
                Ok(None) | Err(_) => {
                    b = reconnect(name, backend, &setup, &mut pending)?;
                }
            }
        }
    }
}

/// The backend hung up: connect to its successor, replay the set-up, and
/// send again the request the dead one left unanswered.
fn reconnect(
    name: &str,
    backend: &Path,
    setup: &Setup,
    pending: &mut Option<Msg>,
) -> io::Result<UnixStream> {
    eprintln!("orchestrator: {name}: backend hung up; the relay waits for the next one");
    let b = connect(backend, RECONNECT_WAIT)?;
    setup.replay(&b)?;
    if let Some(m) = pending.as_ref() {
        send(&b, m)?;
    }
    eprintln!("orchestrator: {name}: relay reconnected; the device state was replayed");
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn msg(request: u32, body: Vec<u8>, fds: Vec<OwnedFd>) -> Msg {
        let mut hdr = [0u8; HDR];
        hdr[0..4].copy_from_slice(&request.to_le_bytes());
        hdr[4..8].copy_from_slice(&1u32.to_le_bytes());
        hdr[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        Msg { hdr, body, fds }
    }

    fn words(v: &[u64]) -> Vec<u8> {
        v.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn a_rings_base_comes_from_its_used_index_in_guest_memory() {
        // 64 KiB of "guest memory" that QEMU maps at 0x7f00_0000_0000.
        let mem = tempfile::tempfile().unwrap();
        mem.set_len(64 << 10).unwrap();
        let user = 0x7f00_0000_0000u64;
        let used = user + 0x3000;
        std::os::unix::fs::FileExt::write_all_at(&mem, &77u16.to_le_bytes(), 0x3002).unwrap();
        let mut table = 1u64.to_le_bytes().to_vec(); // one region, padding
        table.extend(words(&[0, 64 << 10, user, 0]));
        let mut setup = Setup::default();
        setup
            .record(&msg(SET_MEM_TABLE, table, vec![OwnedFd::from(mem)]))
            .unwrap();
        let mut addr = 1u32.to_le_bytes().to_vec(); // ring 1, flags 0
        addr.extend_from_slice(&0u32.to_le_bytes());
        addr.extend(words(&[user + 0x1000, used, user + 0x2000, 0]));
        setup.record(&msg(SET_VRING_ADDR, addr, vec![])).unwrap();
        assert_eq!(setup.used_index(1), Some(77));
        assert_eq!(setup.used_index(0), None, "ring 0 was never set up");

        // QEMU stopping the ring (GET_VRING_BASE) forgets it: a stopped
        // ring is not restarted on the next backend.
        setup
            .record(&msg(GET_VRING_BASE, words(&[1]), vec![]))
            .unwrap();
        assert_eq!(setup.used_index(1), None);
        assert!(setup.rings.is_empty());
    }

    /// The replay kicks a ring only after the backend has answered a
    /// request sent after the ring's SET_VRING_ENABLE: a kick that comes
    /// before the enable is dropped by the library, and the guest's
    /// requests would wait for good.
    #[test]
    fn a_replayed_ring_is_kicked_only_once_enabled() {
        let eventfd = || {
            // SAFETY: eventfd takes no pointers; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: a fresh descriptor owned by nobody else.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        };
        let kick = eventfd();
        let kick_probe = kick.try_clone().unwrap();
        let mut setup = Setup::default();
        setup
            .record(&msg(SET_VRING_KICK, words(&[1]), vec![kick]))
            .unwrap();
        setup
            .record(&msg(
                SET_VRING_ENABLE,
                [1u32, 1].iter().flat_map(|w| w.to_le_bytes()).collect(),
                vec![],
            ))
            .unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let backend = std::thread::spawn(move || {
            let mut enabled = false;
            let mut kicked_before_answer = false;
            while let Ok(Some(m)) = recv(&theirs) {
                match m.request() {
                    SET_VRING_ENABLE => {
                        enabled = true;
                        // A backend slow to get to the enable: the relay
                        // must not have kicked meanwhile.
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        let mut v = [0u8; 8];
                        // SAFETY: an 8-byte read into a local buffer.
                        let n =
                            unsafe { libc::read(kick_probe.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
                        kicked_before_answer |= n == 8;
                    }
                    GET_FEATURES => {
                        let mut r = msg(GET_FEATURES, words(&[0]), vec![]);
                        r.hdr[4..8].copy_from_slice(&(1u32 | FLAG_REPLY).to_le_bytes());
                        send(&theirs, &r).unwrap();
                    }
                    _ => {}
                }
            }
            (enabled, kicked_before_answer, kick_probe)
        });
        setup.replay(&ours).unwrap();
        drop(ours);
        let (enabled, early, probe) = backend.join().unwrap();
        assert!(
            enabled && !early,
            "the kick came before the backend had enabled the ring"
        );
        let mut v = [0u8; 8];
        // SAFETY: an 8-byte read into a local buffer.
        let n = unsafe { libc::read(probe.as_raw_fd(), v.as_mut_ptr().cast(), 8) };
        assert_eq!(n, 8, "the ring was never kicked");
    }

    #[test]
    fn messages_and_their_descriptors_cross_a_socket_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        let fd = OwnedFd::from(tempfile::tempfile().unwrap());
        let kick = words(&[0x101]); // ring 1, no fd flag set
        send(&a, &msg(SET_VRING_KICK, kick.clone(), vec![fd])).unwrap();
        let got = recv(&b).unwrap().unwrap();
        assert_eq!((got.request(), got.body.clone()), (SET_VRING_KICK, kick));
        assert_eq!((got.fds.len(), got.ring()), (1, Some(1)));
        assert!(!got.wants_reply());
        assert!(Msg::request_only(GET_FEATURES).wants_reply());
        // A length past what the relay takes is an error, not an allocation.
        let mut huge = msg(GET_CONFIG, vec![], vec![]);
        huge.hdr[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        send(&a, &huge).unwrap();
        assert!(recv(&b).is_err());
        drop(a);
        assert!(recv(&b).unwrap().is_none(), "end of stream");
    }
}
