//! vhost-user message framing over a Unix socket: a 12-byte header, a body,
//! and descriptors passed with SCM_RIGHTS. Shared by the backends' shim and
//! the orchestrator's relay, which both pass messages through whole.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// The vhost-user header: request, flags, size.
pub const HDR: usize = 12;
/// The largest vhost-user message body (a memory table of 509 regions is
/// smaller than this).
pub const MAX_BODY: usize = 0x1_0000;

/// One vhost-user message and the descriptors that came with it.
pub struct Message {
    pub hdr: [u8; HDR],
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    pub fn request(&self) -> u32 {
        u32::from_le_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]])
    }
    pub fn flags(&self) -> u32 {
        u32::from_le_bytes([self.hdr[4], self.hdr[5], self.hdr[6], self.hdr[7]])
    }
    pub fn set_flags(&mut self, f: u32) {
        self.hdr[4..8].copy_from_slice(&f.to_le_bytes());
    }
}

/// Read one message; `None` at the end of the stream.
pub fn read_message(s: &UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; HDR];
    let mut cmsg = nix::cmsg_space!([RawFd; 8]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut hdr)];
        let msg = recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(v) = c {
                // SAFETY: descriptors just received are ours alone.
                fds.extend(v.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        (msg.bytes, fds)
    };
    if n == 0 {
        return Ok(None);
    }
    let mut r = s;
    if n < HDR {
        r.read_exact(&mut hdr[n..])?;
    }
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "vhost-user message too large",
        ));
    }
    let mut body = vec![0u8; size];
    r.read_exact(&mut body)?;
    Ok(Some(Message { hdr, body, fds }))
}

/// Write one message, its descriptors with the first bytes.
pub fn write_message(s: &UnixStream, m: &Message) -> io::Result<()> {
    let fds: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(&m.hdr), IoSlice::new(&m.body)];
    let total = HDR + m.body.len();
    let sent = sendmsg::<()>(
        s.as_raw_fd(),
        &iov,
        if fds.is_empty() { &[] } else { &cmsg },
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    if sent < total {
        // The rest, without descriptors (they went with the first byte).
        let mut all = m.hdr.to_vec();
        all.extend_from_slice(&m.body);
        let mut w = s;
        w.write_all(&all[sent..])?;
    }
    Ok(())
}
