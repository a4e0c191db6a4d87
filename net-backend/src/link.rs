//! Where frames go: a tap device (one queue per queue pair), a
//! SOCK_SEQPACKET peer, a datagram socket, or a stream peer such as passt
//! (a user-mode network). All but the stream carry each frame behind
//! the 12-byte virtio_net_hdr the guest uses, so frames move between guest
//! memory and the link with one copy (the kernel's), through readv/writev
//! or sendmsg/recvmsg on iovecs into guest memory; a tap can take a batch
//! of transmitted frames in one io_uring submission instead.

use std::ffi::CString;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Mutex;

use crate::uring::TxRing;

/// sizeof(struct virtio_net_hdr_v1): the header on every frame.
pub const VNET_HDR_LEN: usize = 12;

/// Offloads the guest can take (TUNSETOFFLOAD bits).
pub mod offload {
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
}

/// A frame link.
pub trait Link: Send + Sync {
    /// Readable when frames are waiting; polled edge-triggered.
    fn fd(&self) -> RawFd;
    /// Every descriptor the link holds (kept open by the sandbox).
    fn fds(&self) -> Vec<RawFd> {
        vec![self.fd()]
    }
    /// Send one frame (header included). `WouldBlock` means the link is
    /// full for now; `NotConnected` that it is gone (a deleted tap, a peer
    /// that closed).
    fn send(&self, iov: &[libc::iovec]) -> io::Result<usize>;
    /// Send several frames, each a range of `iov`, pushing each one's
    /// result on `out` in order (as [`Link::send`] would answer it).
    fn send_many(
        &self,
        iov: &[libc::iovec],
        frames: &[Range<usize>],
        out: &mut Vec<io::Result<usize>>,
    ) {
        out.extend(frames.iter().map(|r| self.send(&iov[r.clone()])));
    }
    /// Receive one frame (header included) into `iov`; `WouldBlock` when
    /// none is waiting, `NotConnected` when the link is gone, `InvalidData`
    /// when a frame larger than `iov` was consumed.
    fn recv(&self, iov: &[libc::iovec]) -> io::Result<usize>;
    /// Whether frames keep their virtio_net_hdr across the link, so the
    /// guest may hand it partial checksums and large segments (false: the
    /// device offers no offloads).
    fn offloads(&self) -> bool {
        true
    }
    /// Tell the link which offloads the guest accepts.
    fn set_offloads(&self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
    /// Start or stop taking frames for this queue pair (a multiqueue tap
    /// detaches the queue, so the kernel steers flows to the others).
    fn set_active(&self, _active: bool) -> io::Result<()> {
        Ok(())
    }
    fn name(&self) -> &str;
}

fn rc(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A tap whose device was deleted answers EBADFD: the link is gone.
fn tap_gone(r: io::Result<usize>) -> io::Result<usize> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EBADFD) => Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "the tap device was deleted",
        )),
        r => r,
    }
}

/// One queue of a tap device with IFF_VNET_HDR.
pub struct Tap {
    fd: OwnedFd,
    name: String,
    multi_queue: bool,
    /// Batches transmitted frames into one syscall, when turned on (and
    /// until it fails, when frames go by writev again).
    tx_ring: Option<Mutex<Option<TxRing>>>,
}

pub(crate) const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
pub(crate) const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
pub(crate) const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
pub(crate) const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
pub(crate) const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Open (or create) tap `name` with `queues` queues (IFF_MULTI_QUEUE
    /// when more than one).
    pub fn open_queues(name: &str, queues: usize) -> io::Result<Vec<Self>> {
        (0..queues)
            .map(|_| Self::open_with(name, queues > 1))
            .collect()
    }

    /// Open (or create) single-queue tap `name`.
    pub fn open(name: &str) -> io::Result<Self> {
        Self::open_with(name, false)
    }

    fn open_with(name: &str, multi_queue: bool) -> io::Result<Self> {
        if name.is_empty() || name.len() > 15 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a tap name is 1 to 15 bytes",
            ));
        }
        let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
        // SAFETY: a valid C string; the result is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mq = if multi_queue { IFF_MULTI_QUEUE } else { 0 };
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | mq,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    if multi_queue {
                        format!("{e}: tap {name} exists without multi_queue; delete it or create it with `ip tuntap add {name} mode tap multi_queue vnet_hdr`")
                    } else {
                        format!("{e}: tap {name} exists with other flags (multi_queue?); use --num-queue-pairs to match, or delete it")
                    },
                ));
            }
            return Err(e);
        }
        let tap = Tap {
            fd,
            name: name.to_string(),
            multi_queue,
            tx_ring: None,
        };
        tap.set_hdr_len()?;
        Ok(tap)
    }

    /// Send batches of frames through an io_uring restricted to writing
    /// to this tap queue (see [`crate::uring`]).
    pub fn enable_tx_ring(&mut self) -> io::Result<()> {
        self.tx_ring = Some(Mutex::new(Some(TxRing::new(self.fd.as_raw_fd())?)));
        Ok(())
    }

    /// Whether transmitted frames go through the io_uring.
    pub fn tx_ring_active(&self) -> bool {
        self.tx_ring
            .as_ref()
            .is_some_and(|m| m.lock().unwrap_or_else(|e| e.into_inner()).is_some())
    }

    /// The descriptor, for a supervisor that hands it to a backend.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Take an opened tap from a supervisor.
    pub fn from_fd(fd: RawFd) -> io::Result<Self> {
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes an ifreq into `req`.
        if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req) } < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {fd} is not a tap: {}", io::Error::last_os_error()),
            ));
        }
        if req.flags & IFF_VNET_HDR == 0 || req.flags & IFF_TAP == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fd {fd}: open the tap with IFF_TAP | IFF_VNET_HDR | IFF_NO_PI"),
            ));
        }
        // SAFETY: the caller hands this descriptor over.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: F_SETFL on our descriptor.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let end = req.name.iter().position(|&b| b == 0).unwrap_or(16);
        let tap = Tap {
            fd,
            name: String::from_utf8_lossy(&req.name[..end]).into_owned(),
            multi_queue: req.flags & IFF_MULTI_QUEUE != 0,
            tx_ring: None,
        };
        // A queue a previous backend detached comes back; an attached one
        // answers EINVAL, which is fine.
        let _ = tap.set_active(true);
        tap.set_hdr_len()?;
        Ok(tap)
    }

    fn set_hdr_len(&self) -> io::Result<()> {
        let len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETVNETHDRSZ, &len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Link for Tap {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.fd()];
        if let Some(m) = &self.tx_ring {
            let ring = m.lock().unwrap_or_else(|e| e.into_inner());
            v.extend(ring.as_ref().map(|r| r.as_raw_fd()));
        }
        v
    }
    fn send(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the iovecs point into guest memory that the caller keeps
        // mapped for the call.
        tap_gone(rc(unsafe {
            libc::writev(self.fd(), iov.as_ptr(), iov.len() as libc::c_int)
        }))
    }
    fn send_many(
        &self,
        iov: &[libc::iovec],
        frames: &[Range<usize>],
        out: &mut Vec<io::Result<usize>>,
    ) {
        // One frame costs one syscall either way.
        let Some(m) = self.tx_ring.as_ref().filter(|_| frames.len() > 1) else {
            out.extend(frames.iter().map(|r| self.send(&iov[r.clone()])));
            return;
        };
        // Only this queue pair's worker sends here: never contended.
        let mut ring = m.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = ring.as_mut() else {
            out.extend(frames.iter().map(|r| self.send(&iov[r.clone()])));
            return;
        };
        let base = out.len();
        let failed = match r.write(iov, frames, out) {
            Err(e) => Some(e.to_string()),
            Ok(()) => None,
        };
        // A tap without non-blocking writes for io_uring (an older kernel)
        // refuses RWF_NOWAIT: those frames go by writev, and so does
        // everything after them.
        let mut refused = false;
        for (r, range) in out[base..].iter_mut().zip(frames) {
            match r {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    refused = true;
                    *r = self.send(&iov[range.clone()]);
                }
                Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                    *r = tap_gone(Err(io::Error::from_raw_os_error(libc::EBADFD)));
                }
                _ => {}
            }
        }
        let failed = failed.or(refused.then(|| "the tap refuses RWF_NOWAIT".to_string()));
        if let Some(why) = failed {
            tracing::warn!(
                tap = %self.name,
                "transmit io_uring: {why}; sending by writev from now on"
            );
            *ring = None;
        }
    }
    fn recv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: as above, writable guest buffers.
        tap_gone(rc(unsafe {
            libc::readv(self.fd(), iov.as_ptr(), iov.len() as libc::c_int)
        }))
    }
    fn set_offloads(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(self.fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    fn set_active(&self, active: bool) -> io::Result<()> {
        if !self.multi_queue {
            return Ok(());
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: if active {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads an ifreq, which `req` is.
        if unsafe { libc::ioctl(self.fd(), TUNSETQUEUE, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            // Already in the asked state.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// The address of a Unix socket: a path, or with a leading `@` a name in
/// the abstract namespace (which a socket made before the sandbox still
/// reaches from inside it: the name is looked up in the socket's own
/// network namespace, not through the filesystem).
fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    // SAFETY: an all-zero sockaddr_un is valid; the path is copied in
    // below with room for the terminating NUL.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path empty or too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let (name, abstract_) = match bytes.strip_prefix(b"@") {
        Some(n) => (n, true),
        None => (bytes, false),
    };
    let start = usize::from(abstract_);
    for (d, s) in addr.sun_path[start..].iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    let base = std::mem::size_of::<libc::sa_family_t>();
    let len = if abstract_ {
        base + 1 + name.len()
    } else {
        std::mem::size_of::<libc::sockaddr_un>()
    };
    Ok((addr, len as libc::socklen_t))
}

fn is_abstract(path: &Path) -> bool {
    std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).starts_with(b"@")
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    unix_socket(libc::SOCK_SEQPACKET)
}

fn unix_socket(kind: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// sendmsg of one frame; a peer that has gone reads as `NotConnected`.
fn send_frame(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: a msghdr naming only the caller's iovecs.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len();
    // SAFETY: as above; the buffers are mapped for the call.
    match rc(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) }) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) => {
            Err(io::Error::new(io::ErrorKind::NotConnected, e))
        }
        r => r,
    }
}

/// recvmsg of one frame; a peer that has gone reads as `NotConnected`, a
/// frame larger than `iov` (consumed) as `InvalidData`.
fn recv_frame(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: a msghdr naming only the caller's iovecs.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len();
    // SAFETY: as above.
    let n = match rc(unsafe { libc::recvmsg(fd, &mut msg, 0) }) {
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
            return Err(io::Error::new(io::ErrorKind::NotConnected, e))
        }
        r => r?,
    };
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "the peer closed the socket",
        ));
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame larger than the buffers",
        ));
    }
    Ok(n)
}

/// connect(2) or bind(2) `fd` to the address of `path`.
fn at_addr(
    fd: &OwnedFd,
    path: &Path,
    call: unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int,
) -> io::Result<()> {
    let (addr, len) = unix_addr(path)?;
    // SAFETY: `addr` is a valid sockaddr_un of length `len`; `call` is
    // connect or bind, which only read it.
    let r = unsafe {
        call(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn connect(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    at_addr(fd, path, libc::connect)
}

/// How long a name in the abstract namespace may stay taken by the
/// backend we replace before binding gives up.
const ABSTRACT_NAME_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Bind `fd` at `path` (a stale socket file there is replaced).
///
/// An abstract name cannot be taken over that way: it is free only once
/// every process holding the old socket is gone. A backend restarted at
/// once after a SIGKILL races the old one's sandboxed child, which dies a
/// moment after the parent its supervisor waited for, so a name in use is
/// retried for a while before it counts as another listener's.
fn bind(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if !is_abstract(path) {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if m.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        return at_addr(fd, path, libc::bind);
    }
    let deadline = std::time::Instant::now() + ABSTRACT_NAME_WAIT;
    let mut logged = false;
    loop {
        match at_addr(fd, path, libc::bind) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                if std::time::Instant::now() >= deadline {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "{e}; another process still listens there after {}s \
                             (stop it, or pick another name)",
                            ABSTRACT_NAME_WAIT.as_secs()
                        ),
                    ));
                }
                if !logged {
                    tracing::info!(
                        link = %path.display(),
                        "the name is still taken, waiting for the previous listener to go"
                    );
                    logged = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// A SOCK_SEQPACKET peer we connected to: one message per frame.
pub struct Seqpacket {
    fd: OwnedFd,
    name: String,
}

impl Seqpacket {
    /// Connect to the peer listening at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let fd = seqpacket_socket()?;
        connect(&fd, path)?;
        Ok(Seqpacket {
            fd,
            name: path.display().to_string(),
        })
    }
}

impl Link for Seqpacket {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn send(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        send_frame(self.fd(), iov)
    }
    fn recv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        recv_frame(self.fd(), iov)
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// A SOCK_SEQPACKET socket we listen on: one peer at a time (a newer one
/// replaces it), so the other side may restart and connect again. Frames
/// sent while no peer is connected are dropped, as on an unplugged cable.
///
/// The descriptor the worker polls is a private epoll set holding the
/// listener and the current peer, so one registration covers both.
pub struct SeqpacketListener {
    listener: OwnedFd,
    poll: OwnedFd,
    peer: std::sync::Mutex<Option<OwnedFd>>,
    name: String,
}

impl SeqpacketListener {
    /// Listen at `path` (a stale socket file there is replaced).
    pub fn bind(path: &Path) -> io::Result<Self> {
        let listener = seqpacket_socket()?;
        bind(&listener, path)?;
        // SAFETY: a plain socket call.
        if unsafe { libc::listen(listener.as_raw_fd(), 4) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: epoll_create1 takes no pointers; checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let poll = unsafe { OwnedFd::from_raw_fd(ep) };
        let l = SeqpacketListener {
            listener,
            poll,
            peer: std::sync::Mutex::new(None),
            name: format!("{} (listening)", path.display()),
        };
        l.watch(l.listener.as_raw_fd(), libc::EPOLLIN as u32)?;
        Ok(l)
    }

    fn watch(&self, fd: RawFd, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events,
            u64: fd as u64,
        };
        // SAFETY: EPOLL_CTL_ADD with a valid event on our epoll set.
        if unsafe { libc::epoll_ctl(self.poll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Take the private set's events (so the next one wakes the worker
    /// again) and accept whoever is waiting; the newest peer wins.
    fn refresh(&self, peer: &mut Option<OwnedFd>) -> bool {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: epoll_wait writes at most 4 events into `evs`.
        unsafe { libc::epoll_wait(self.poll.as_raw_fd(), evs.as_mut_ptr(), 4, 0) };
        let mut accepted = false;
        loop {
            // SAFETY: accept on our listener; the result is checked.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                break;
            }
            // SAFETY: a fresh descriptor owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if let Err(e) = self.watch(fd.as_raw_fd(), (libc::EPOLLIN | libc::EPOLLET) as u32) {
                tracing::warn!(error = %e, "cannot watch the new peer");
                continue;
            }
            tracing::info!(link = %self.name, "a peer connected");
            *peer = Some(fd);
            accepted = true;
        }
        accepted
    }
}

impl Link for SeqpacketListener {
    fn fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }
    fn fds(&self) -> Vec<RawFd> {
        vec![self.poll.as_raw_fd(), self.listener.as_raw_fd()]
    }
    fn send(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let mut peer = self.peer.lock().unwrap_or_else(|e| e.into_inner());
        if peer.is_none() {
            self.refresh(&mut peer);
        }
        let Some(fd) = peer.as_ref().map(|p| p.as_raw_fd()) else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no peer is connected",
            ));
        };
        let r = send_frame(fd, iov);
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::NotConnected) {
            *peer = None;
        }
        r
    }
    fn recv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let mut peer = self.peer.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..2 {
            if let Some(fd) = peer.as_ref().map(|p| p.as_raw_fd()) {
                match recv_frame(fd, iov) {
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                        tracing::info!(link = %self.name, "the peer went away");
                        *peer = None;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    r => return r,
                }
            }
            // Nothing to read: take the pending events, then look once
            // more, so a frame that came in between is not left behind.
            if attempt == 0 && !self.refresh(&mut peer) && peer.is_none() {
                break;
            }
        }
        Err(io::Error::from(io::ErrorKind::WouldBlock))
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// A SOCK_DGRAM link: one datagram per frame. The connecting side takes an
/// address in the abstract namespace (autobind) and greets the listening
/// side with an empty datagram; the listening side answers whoever wrote
/// to it last, so either side may restart. The listening side's replies
/// go to abstract addresses, which its socket reaches from inside the
/// sandbox; a connecting side reaches a listener inside the sandbox again
/// after the listener restarts only if the listener's address is abstract
/// (`@name`) too.
pub struct Dgram {
    fd: OwnedFd,
    /// Where frames go: fixed for the connecting side (None: connected),
    /// learnt from each datagram for the listening side.
    peer: std::sync::Mutex<Option<(libc::sockaddr_un, libc::socklen_t)>>,
    listening: bool,
    /// The connecting side's listener address, to connect to again when
    /// it has restarted.
    target: Option<std::path::PathBuf>,
    name: String,
}

impl Dgram {
    /// Connect to the datagram socket at `path` and say hello.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let fd = unix_socket(libc::SOCK_DGRAM)?;
        // Autobind: an address of our own (abstract), so replies find us.
        let family = libc::AF_UNIX as libc::sa_family_t;
        // SAFETY: a sockaddr of just the family asks for autobind.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&family as *const libc::sa_family_t).cast(),
                std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        connect(&fd, path)?;
        let d = Dgram {
            fd,
            peer: std::sync::Mutex::new(None),
            listening: false,
            target: Some(path.to_path_buf()),
            name: path.display().to_string(),
        };
        d.hello()?;
        Ok(d)
    }

    /// Take datagrams at `path`; frames go back to the newest writer.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let fd = unix_socket(libc::SOCK_DGRAM)?;
        bind(&fd, path)?;
        Ok(Dgram {
            fd,
            peer: std::sync::Mutex::new(None),
            listening: true,
            target: None,
            name: format!("{} (listening)", path.display()),
        })
    }

    fn hello(&self) -> io::Result<()> {
        // SAFETY: a zero-length send on our socket.
        rc(unsafe { libc::send(self.fd.as_raw_fd(), std::ptr::null(), 0, libc::MSG_NOSIGNAL) })
            .map(drop)
    }
}

impl Link for Dgram {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn send(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: a msghdr naming only the caller's iovecs and our address.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        let peer = *self.peer.lock().unwrap_or_else(|e| e.into_inner());
        let mut to;
        if self.listening {
            let Some((addr, len)) = peer else {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "no peer has written yet",
                ));
            };
            to = addr;
            msg.msg_name = (&mut to as *mut libc::sockaddr_un).cast();
            msg.msg_namelen = len;
        }
        // SAFETY: as above; the buffers are mapped for the call.
        match rc(unsafe { libc::sendmsg(self.fd(), &msg, libc::MSG_NOSIGNAL) }) {
            // The listener restarted (its old socket is gone): connect to
            // the new one if its address can still be reached, and greet
            // it. This frame is dropped, as on a cable being replugged.
            Err(e) if !self.listening && e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                if let Some(t) = &self.target {
                    if connect(&self.fd, t).is_ok() && self.hello().is_ok() {
                        tracing::info!(link = %self.name, "connected to the peer again");
                    }
                }
                Err(io::Error::new(io::ErrorKind::ConnectionRefused, e))
            }
            r => r,
        }
    }
    fn recv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        loop {
            // SAFETY: an all-zero sockaddr_un is valid, for the sender.
            let mut from: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            // SAFETY: a msghdr naming the caller's iovecs and `from`.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = iov.len();
            msg.msg_name = (&mut from as *mut libc::sockaddr_un).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            // SAFETY: as above.
            let n = rc(unsafe { libc::recvmsg(self.fd(), &mut msg, 0) })?;
            if self.listening && msg.msg_namelen > std::mem::size_of::<libc::sa_family_t>() as u32 {
                let mut peer = self.peer.lock().unwrap_or_else(|e| e.into_inner());
                let known = peer.is_some_and(|(a, l)| {
                    l == msg.msg_namelen && a.sun_path[..] == from.sun_path[..]
                });
                if !known {
                    tracing::info!(link = %self.name, "a peer wrote: frames go to it now");
                    *peer = Some((from, msg.msg_namelen));
                }
            }
            if n == 0 {
                // A greeting, not a frame.
                continue;
            }
            if msg.msg_flags & libc::MSG_TRUNC != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "frame larger than the buffers",
                ));
            }
            return Ok(n);
        }
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// The largest Ethernet frame a stream peer may announce: the device's
/// largest frame without its virtio_net_hdr.
const STREAM_FRAME_MAX: usize = crate::backend::MAX_FRAME - VNET_HDR_LEN;
/// The smallest: an Ethernet header.
const STREAM_FRAME_MIN: usize = 14;

/// A SOCK_STREAM peer that puts each Ethernet frame behind its length, a
/// 32-bit big-endian count of bytes: the framing of QEMU's `-netdev stream`,
/// which passt (a user-mode network that needs no privilege) speaks. The
/// frames carry no virtio_net_hdr there, so the header is taken off on the
/// way out and a plain one put on the way in; the device offers the guest no
/// offloads on this link ([`Link::offloads`]), so it has none to lose.
///
/// A frame the socket took only part of is finished before the next one
/// goes; the peer closing, or announcing a length no frame has (the stream
/// is out of step), ends the link.
pub struct Stream {
    fd: OwnedFd,
    name: String,
    tx: Mutex<StreamTx>,
    rx: Mutex<StreamRx>,
}

struct StreamTx {
    /// The unsent end of a frame the socket took only part of.
    pending: Vec<u8>,
    iov: Vec<libc::iovec>,
    /// The peer took nothing for a whole [`STREAM_TX_WAIT_MS`]: frames are
    /// dropped without waiting until it takes some again.
    stalled: bool,
}

/// How long a frame waits for room in the socket. A stream socket holds
/// only a few large frames, and the peer takes them within microseconds;
/// dropping a frame whenever the socket is full would make the guest's TCP
/// retransmit at every burst. Waiting here holds the transmit ring, so the
/// guest is slowed the way a full tap queue slows it.
const STREAM_TX_WAIT_MS: libc::c_int = 200;

struct StreamRx {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

// SAFETY: the iovec scratch holds no pointers between calls (cleared after
// each send), and the rest is plain data.
unsafe impl Send for StreamTx {}

impl Stream {
    /// Connect to the peer listening at `path`. A peer started just
    /// before may have made its socket without listening on it yet: a
    /// refused or missing socket is tried again for up to a second.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let fd = unix_socket(libc::SOCK_STREAM)?;
            match connect(&fd, path) {
                Ok(()) => return Ok(Self::from_fd(fd, path.display().to_string())),
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT))
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A connected stream socket.
    pub fn from_fd(fd: OwnedFd, name: String) -> Self {
        Stream {
            fd,
            name,
            tx: Mutex::new(StreamTx {
                pending: Vec::new(),
                iov: Vec::with_capacity(8),
                stalled: false,
            }),
            rx: Mutex::new(StreamRx {
                buf: vec![0u8; 2 * (4 + STREAM_FRAME_MAX)].into_boxed_slice(),
                start: 0,
                end: 0,
            }),
        }
    }

    /// Stop using the socket for good (both ways), so the next call on
    /// the link fails at once.
    fn broken(&self, why: String) -> io::Error {
        // SAFETY: shutdown on our own socket.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        io::Error::new(io::ErrorKind::NotConnected, why)
    }

    /// Send `iov` without blocking; how many bytes went.
    fn send_some(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        send_frame(self.fd.as_raw_fd(), iov)
    }

    /// Wait until the socket takes more, for up to `ms`; whether it will.
    fn writable(&self, ms: libc::c_int) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one pollfd, ours, for the call.
        unsafe { libc::poll(&mut p, 1, ms) > 0 }
    }

    /// Whether to try a send again after the socket said it was full:
    /// after waiting for room, unless the peer has stalled.
    fn room(&self, tx: &mut StreamTx) -> bool {
        let ms = if tx.stalled { 0 } else { STREAM_TX_WAIT_MS };
        let ok = self.writable(ms);
        tx.stalled = !ok;
        ok
    }
}

impl StreamTx {
    /// Send what is left of a frame; whether it is all gone.
    fn flush(&mut self, link: &Stream) -> io::Result<bool> {
        while !self.pending.is_empty() {
            let iov = [libc::iovec {
                iov_base: self.pending.as_mut_ptr().cast(),
                iov_len: self.pending.len(),
            }];
            match link.send_some(&iov) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// Copy `bytes` into `iov` from byte `at` of it on; the bytes copied.
///
/// # Safety
/// Every iovec must describe memory writable for its length.
unsafe fn copy_into_iov(iov: &[libc::iovec], mut at: usize, mut bytes: &[u8]) -> usize {
    let mut copied = 0;
    for v in iov {
        if bytes.is_empty() {
            break;
        }
        if at >= v.iov_len {
            at -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - at).min(bytes.len());
        // SAFETY: within the iovec (the caller's contract) and `bytes`;
        // guest memory never overlaps our buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.iov_base.cast::<u8>().add(at), n)
        };
        bytes = &bytes[n..];
        copied += n;
        at = 0;
    }
    copied
}

impl Link for Stream {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn offloads(&self) -> bool {
        false
    }
    fn send(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let len = total.saturating_sub(VNET_HDR_LEN);
        if !(STREAM_FRAME_MIN..=STREAM_FRAME_MAX).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a frame of {len} bytes"),
            ));
        }
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        while !tx.flush(self)? {
            if !self.room(&mut tx) {
                // The peer takes nothing: dropped, as on a jammed wire.
                return Err(io::Error::from(io::ErrorKind::WouldBlock));
            }
        }
        let mut head = (len as u32).to_be_bytes();
        let tx = &mut *tx;
        tx.iov.clear();
        tx.iov.push(libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: head.len(),
        });
        // The frame without its virtio_net_hdr.
        let mut skip = VNET_HDR_LEN;
        for v in iov {
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            tx.iov.push(libc::iovec {
                // SAFETY: within the caller's iovec.
                iov_base: unsafe { v.iov_base.cast::<u8>().add(skip) }.cast(),
                iov_len: v.iov_len - skip,
            });
            skip = 0;
        }
        let sent = loop {
            match self.send_some(&tx.iov) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.room(tx) => continue,
                r => break r,
            }
        };
        if sent.is_ok() {
            tx.stalled = false;
        }
        let r = match sent {
            Ok(n) if n == 4 + len => Ok(total),
            Ok(n) => {
                // Keep the rest: the frame is in the stream, and must end
                // before another begins.
                let mut rest = Vec::with_capacity(4 + len - n);
                let mut at = n;
                for v in &tx.iov {
                    if at >= v.iov_len {
                        at -= v.iov_len;
                        continue;
                    }
                    // SAFETY: within the iovec, which is mapped for this call.
                    rest.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(v.iov_base.cast::<u8>().add(at), v.iov_len - at)
                    });
                    at = 0;
                }
                tx.pending = rest;
                Ok(total)
            }
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                Err(self.broken(format!("the peer closed the connection ({e})")))
            }
            Err(e) => Err(e),
        };
        tx.iov.clear();
        r
    }
    fn recv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        let rx = &mut *rx;
        loop {
            let have = rx.end - rx.start;
            if have >= 4 {
                let mut head = [0u8; 4];
                head.copy_from_slice(&rx.buf[rx.start..rx.start + 4]);
                let len = u32::from_be_bytes(head) as usize;
                if !(STREAM_FRAME_MIN..=STREAM_FRAME_MAX).contains(&len) {
                    return Err(self.broken(format!(
                        "the peer announced a frame of {len} bytes: the stream is out of step"
                    )));
                }
                if have >= 4 + len {
                    let frame = rx.start + 4..rx.start + 4 + len;
                    rx.start = frame.end;
                    let room: usize = iov.iter().map(|v| v.iov_len).sum();
                    if room < VNET_HDR_LEN + len {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "frame larger than the buffers",
                        ));
                    }
                    // SAFETY: the caller's iovecs are writable guest memory.
                    unsafe {
                        copy_into_iov(iov, 0, &[0u8; VNET_HDR_LEN]);
                        copy_into_iov(iov, VNET_HDR_LEN, &rx.buf[frame]);
                    }
                    return Ok(VNET_HDR_LEN + len);
                }
            }
            // Room for the whole of the next frame after what is held.
            if rx.start > 0 && rx.buf.len() - rx.start < 4 + STREAM_FRAME_MAX {
                rx.buf.copy_within(rx.start..rx.end, 0);
                rx.end -= rx.start;
                rx.start = 0;
            }
            let end = rx.end;
            let free = &mut rx.buf[end..];
            // SAFETY: reading into our own buffer, within its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), free.as_mut_ptr().cast(), free.len(), 0) };
            match rc(n) {
                Ok(0) => return Err(self.broken("the peer closed the connection".into())),
                Ok(n) => rx.end += n,
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                    return Err(self.broken(format!("the peer reset the connection ({e})")))
                }
                Err(e) => return Err(e),
            }
        }
    }
    fn name(&self) -> &str {
        &self.name
    }
}
