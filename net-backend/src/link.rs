//! Where frames go: a tap device or a SOCK_SEQPACKET peer. Both carry each
//! frame behind the 12-byte virtio_net_hdr the guest uses, so frames move
//! between guest memory and the link with one copy (the kernel's), through
//! readv/writev on iovecs into guest memory.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

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
    /// Send one frame (header included). `WouldBlock` means the link is
    /// full for now.
    fn send(&self, iov: &[libc::iovec]) -> io::Result<usize>;
    /// Receive one frame (header included) into `iov`; `WouldBlock` when
    /// none is waiting.
    fn recv(&self, iov: &[libc::iovec]) -> io::Result<usize>;
    /// Tell the link which offloads the guest accepts.
    fn set_offloads(&self, _flags: u32) -> io::Result<()> {
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

/// A tap device with IFF_VNET_HDR.
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Open (or create) tap `name`.
    pub fn open(name: &str) -> io::Result<Self> {
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
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let tap = Tap {
            fd,
            name: name.to_string(),
        };
        tap.set_hdr_len()?;
        Ok(tap)
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
        };
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
    fn send(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the iovecs point into guest memory that the caller keeps
        // mapped for the call.
        rc(unsafe { libc::writev(self.fd(), iov.as_ptr(), iov.len() as libc::c_int) })
    }
    fn recv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: as above, writable guest buffers.
        rc(unsafe { libc::readv(self.fd(), iov.as_ptr(), iov.len() as libc::c_int) })
    }
    fn set_offloads(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(self.fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// A SOCK_SEQPACKET peer: one message per frame.
pub struct Seqpacket {
    fd: OwnedFd,
    name: String,
}

impl Seqpacket {
    /// Connect to the peer listening at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        // SAFETY: plain socket creation; checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        // SAFETY: an all-zero sockaddr_un is valid; the path is copied in
        // below with room for the terminating NUL.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        if bytes.len() >= addr.sun_path.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "socket path too long",
            ));
        }
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        // SAFETY: `addr` is a valid sockaddr_un of the given size.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
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
        // SAFETY: a msghdr naming only the caller's iovecs.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        // SAFETY: as above; the buffers are mapped for the call.
        rc(unsafe { libc::sendmsg(self.fd(), &msg, libc::MSG_NOSIGNAL) })
    }
    fn recv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: a msghdr naming only the caller's iovecs.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        // SAFETY: as above.
        let n = rc(unsafe { libc::recvmsg(self.fd(), &mut msg, 0) })?;
        if n == 0 {
            // The peer closed: nothing will come; treat as no frame.
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame larger than the buffers",
            ));
        }
        Ok(n)
    }
    fn name(&self) -> &str {
        &self.name
    }
}
