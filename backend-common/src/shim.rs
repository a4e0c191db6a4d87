//! A vhost-user message shim between the frontend and the library's
//! request handler, for frontends that send a message earlier than the
//! library accepts it.
//!
//! QEMU's virtio-net enables its rings (SET_VRING_ENABLE) when the device is
//! reset, before it has acknowledged any feature; the vhost crate refuses
//! SET_VRING_ENABLE until VHOST_USER_F_PROTOCOL_FEATURES is acknowledged
//! and drops the connection. The shim holds such early enables (answering
//! them itself if a reply is asked for) and passes them on right after the
//! frontend's SET_FEATURES. Everything else, descriptors included, passes
//! through unchanged, in order, both ways.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use crate::vu_msg::{read_message, write_message, Message, HDR};

const SET_FEATURES: u32 = 2;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_BACKEND_REQ_FD: u32 = 21;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
/// VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD.
const PROTOCOL_INFLIGHT: u64 = 0x1000;
const SET_VRING_ENABLE: u32 = 18;
const GET_VRING_BASE: u32 = 11;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Where the shim leaves a copy of the backend channel (the socket the
/// frontend passes in SET_BACKEND_REQ_FD), so the backend can send its own
/// requests (a config-change notice) on it.
pub type ChannelSlot = std::sync::Arc<std::sync::Mutex<Option<OwnedFd>>>;

/// Told of each SET_VRING_ENABLE (ring index, enabled) as the shim passes
/// it on, for a backend that acts on it beyond the ring itself (a
/// multiqueue tap detaching a queue).
pub type RingEnableHook = std::sync::Arc<dyn Fn(u32, bool) + Send + Sync>;

/// Called with the ring index before a GET_VRING_BASE reaches the library,
/// and returns once the backend has finished (and returned to the used
/// ring) every request it took from that ring: the index the frontend gets
/// back then covers everything done, and nothing completes behind it.
pub type RingStopHook = std::sync::Arc<dyn Fn(u32) + Send + Sync>;

/// What the shim does beyond relaying.
#[derive(Default)]
pub struct ShimHooks {
    pub channel: Option<ChannelSlot>,
    pub inflight: Option<InflightSlot>,
    pub ring_enable: Option<RingEnableHook>,
    pub ring_stop: Option<RingStopHook>,
}

/// A SET_VRING_ENABLE's ring and state.
fn ring_state(m: &Message) -> Option<(u32, bool)> {
    let b = m.body.get(0..8)?;
    let index = u32::from_le_bytes(b[0..4].try_into().ok()?);
    let num = u32::from_le_bytes(b[4..8].try_into().ok()?);
    Some((index, num != 0))
}

/// The vhost-user inflight area (GET_INFLIGHT_FD / SET_INFLIGHT_FD), which
/// the library does not implement: the shim answers those messages and
/// leaves the area here for the backend to record requests in.
#[derive(Debug)]
pub struct Inflight {
    pub fd: OwnedFd,
    pub size: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

/// Where the shim leaves the inflight area.
pub type InflightSlot = std::sync::Arc<std::sync::Mutex<Option<Inflight>>>;

/// Bytes of one queue's part of the inflight area: a 16-byte header, then
/// 16 bytes per descriptor (the layout of the vhost-user specification for
/// split rings), rounded up to 64.
pub fn inflight_queue_bytes(queue_size: u16) -> u64 {
    (16 + 16 * u64::from(queue_size)).next_multiple_of(64)
}

fn new_inflight(num_queues: u16, queue_size: u16) -> io::Result<Inflight> {
    let size = u64::from(num_queues) * inflight_queue_bytes(queue_size);
    // SAFETY: a constant C string; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"vhost-user-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sizing our memfd; it reads as zeros.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Its size is fixed for good: a frontend that shrank it under a
    // backend's mapping would kill the backend (SIGBUS) at its next write.
    // SAFETY: fcntl on our own descriptor.
    if unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(Inflight {
        fd,
        size,
        num_queues,
        queue_size,
    })
}

/// The body of GET/SET_INFLIGHT_FD: mmap_size, mmap_offset, num_queues,
/// queue_size.
fn inflight_body(b: &[u8]) -> Option<(u64, u16, u16)> {
    Some((
        u64::from_le_bytes(b.get(0..8)?.try_into().ok()?),
        u16::from_le_bytes(b.get(16..18)?.try_into().ok()?),
        u16::from_le_bytes(b.get(18..20)?.try_into().ok()?),
    ))
}

fn ack(front: &UnixStream, m: &Message) -> io::Result<()> {
    if m.flags() & FLAG_NEED_REPLY == 0 {
        return Ok(());
    }
    let mut reply = Message {
        hdr: m.hdr,
        body: 0u64.to_le_bytes().to_vec(),
        fds: Vec::new(),
    };
    reply.set_flags(FLAG_VERSION | FLAG_REPLY);
    reply.hdr[8..12].copy_from_slice(&8u32.to_le_bytes());
    write_message(front, &reply)
}

/// Answer an inflight message on the library's behalf. Returns whether it
/// was one (and so must not be passed on).
fn answer_inflight(front: &UnixStream, m: &mut Message, slot: &InflightSlot) -> io::Result<bool> {
    match m.request() {
        GET_INFLIGHT_FD => {
            let (_, nq, qs) = inflight_body(&m.body).ok_or(io::ErrorKind::InvalidData)?;
            let area = new_inflight(nq, qs)?;
            let mut body = vec![0u8; 24];
            body[0..8].copy_from_slice(&area.size.to_le_bytes());
            body[16..18].copy_from_slice(&nq.to_le_bytes());
            body[18..20].copy_from_slice(&qs.to_le_bytes());
            let mut reply = Message {
                hdr: m.hdr,
                body,
                fds: vec![area.fd.try_clone()?],
            };
            reply.set_flags(FLAG_VERSION | FLAG_REPLY);
            reply.hdr[8..12].copy_from_slice(&24u32.to_le_bytes());
            write_message(front, &reply)?;
            tracing::info!(
                queues = nq,
                queue_size = qs,
                bytes = area.size,
                "inflight area made for the frontend"
            );
            if let Ok(mut s) = slot.lock() {
                *s = Some(area);
            }
            Ok(true)
        }
        SET_INFLIGHT_FD => {
            let (size, nq, qs) = inflight_body(&m.body).ok_or(io::ErrorKind::InvalidData)?;
            if let (Some(fd), Ok(mut s)) = (m.fds.pop(), slot.lock()) {
                tracing::info!(
                    queues = nq,
                    queue_size = qs,
                    bytes = size,
                    "inflight area taken from the frontend"
                );
                *s = Some(Inflight {
                    fd,
                    size,
                    num_queues: nq,
                    queue_size: qs,
                });
            }
            ack(front, m)?;
            Ok(true)
        }
        SET_PROTOCOL_FEATURES => {
            // The library knows nothing of the inflight area.
            let mut v = u64::from_le_bytes(
                m.body
                    .get(0..8)
                    .and_then(|b| b.try_into().ok())
                    .unwrap_or([0; 8]),
            );
            v &= !PROTOCOL_INFLIGHT;
            if m.body.len() >= 8 {
                m.body[0..8].copy_from_slice(&v.to_le_bytes());
            }
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// Relay between `front` (the frontend) and `back` (the library's end)
/// until either closes; returns when both directions are done.
pub fn relay(front: UnixStream, back: UnixStream, hooks: ShimHooks) {
    let ShimHooks {
        channel,
        inflight,
        ring_enable,
        ring_stop,
    } = hooks;
    let enabled = |m: &Message| {
        if let (Some(f), Some((i, on))) = (&ring_enable, ring_state(m)) {
            f(i, on);
        }
    };
    let (f2, b2) = match (front.try_clone(), back.try_clone()) {
        (Ok(f), Ok(b)) => (f, b),
        _ => return,
    };
    let offer_inflight = inflight.is_some();
    // Backend to frontend: replies, passed as they are, except that the
    // protocol features include the inflight area when the shim keeps it.
    let up = std::thread::spawn(move || {
        while let Ok(Some(mut m)) = read_message(&b2) {
            if offer_inflight && m.request() == GET_PROTOCOL_FEATURES && m.body.len() >= 8 {
                let v = u64::from_le_bytes(m.body[0..8].try_into().unwrap_or([0; 8]));
                m.body[0..8].copy_from_slice(&(v | PROTOCOL_INFLIGHT).to_le_bytes());
            }
            if write_message(&f2, &m).is_err() {
                break;
            }
        }
        let _ = f2.shutdown(std::net::Shutdown::Both);
    });
    let mut features_seen = false;
    let mut held: Vec<Message> = Vec::new();
    while let Ok(Some(mut m)) = read_message(&front) {
        let req = m.request();
        if req == SET_VRING_ENABLE && !features_seen {
            if m.flags() & FLAG_NEED_REPLY != 0 {
                // Answer "done" now; the real one goes later, unanswered.
                let mut reply = Message {
                    hdr: m.hdr,
                    body: 0u64.to_le_bytes().to_vec(),
                    fds: Vec::new(),
                };
                reply.set_flags(FLAG_VERSION | FLAG_REPLY);
                reply.hdr[8..12].copy_from_slice(&8u32.to_le_bytes());
                if write_message(&front, &reply).is_err() {
                    break;
                }
                m.set_flags(m.flags() & !FLAG_NEED_REPLY);
            }
            // Only the last word on each ring counts: a frontend repeating
            // itself does not grow the list.
            let ring = m.body.get(0..4);
            held.retain(|h| h.body.get(0..4) != ring);
            held.push(m);
            continue;
        }
        if let Some(slot) = &inflight {
            match answer_inflight(&front, &mut m, slot) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(_) => break,
            }
        }
        if req == SET_BACKEND_REQ_FD {
            if let (Some(slot), Some(fd)) = (&channel, m.fds.first()) {
                if let (Ok(copy), Ok(mut s)) = (fd.try_clone(), slot.lock()) {
                    *s = Some(copy);
                }
            }
        }
        if req == GET_VRING_BASE {
            let ring = m.body.get(0..4).and_then(|b| b.try_into().ok());
            if let (Some(f), Some(b)) = (&ring_stop, ring) {
                f(u32::from_le_bytes(b));
            }
        }
        if write_message(&back, &m).is_err() {
            break;
        }
        if req == SET_VRING_ENABLE {
            enabled(&m);
        }
        if req == SET_FEATURES && !features_seen {
            features_seen = true;
            let mut ok = true;
            for h in held.drain(..) {
                ok &= write_message(&back, &h).is_ok();
                enabled(&h);
            }
            if !ok {
                break;
            }
        }
    }
    let _ = back.shutdown(std::net::Shutdown::Both);
    let _ = front.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
    if let Some(slot) = channel {
        if let Ok(mut s) = slot.lock() {
            *s = None;
        }
    }
}

/// Send VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on a backend channel: the
/// frontend re-reads the config space and tells the guest.
pub fn send_config_change(channel: &OwnedFd) -> io::Result<()> {
    const CONFIG_CHANGE_MSG: u32 = 2;
    let mut hdr = [0u8; HDR];
    hdr[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
    hdr[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
    // SAFETY: writes our 12 bytes to a socket we hold.
    let n = unsafe { libc::write(channel.as_raw_fd(), hdr.as_ptr().cast(), HDR) };
    if n == HDR as isize {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn msg(req: u32, flags: u32, body: &[u8]) -> Vec<u8> {
        let mut v = req.to_le_bytes().to_vec();
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&(body.len() as u32).to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn an_early_enable_waits_for_set_features() {
        let (mut front_peer, front) = UnixStream::pair().unwrap();
        let (back, mut back_peer) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay(front, back, ShimHooks::default()));
        let enable = msg(
            SET_VRING_ENABLE,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &[0, 0, 0, 0, 1, 0, 0, 0],
        );
        front_peer.write_all(&enable).unwrap();
        // Answered by the shim at once.
        let mut reply = [0u8; HDR + 8];
        front_peer.read_exact(&mut reply).unwrap();
        assert_eq!(
            u32::from_le_bytes(reply[4..8].try_into().unwrap()),
            FLAG_VERSION | FLAG_REPLY
        );
        front_peer.write_all(&msg(1, FLAG_VERSION, &[])).unwrap(); // GET_FEATURES
        front_peer
            .write_all(&msg(SET_FEATURES, FLAG_VERSION, &[0; 8]))
            .unwrap();
        // The backend sees GET_FEATURES, SET_FEATURES, then the enable
        // without a reply asked for.
        let mut got = vec![0u8; HDR + HDR + 8 + HDR + 8];
        back_peer.read_exact(&mut got).unwrap();
        assert_eq!(u32::from_le_bytes(got[0..4].try_into().unwrap()), 1);
        assert_eq!(
            u32::from_le_bytes(got[12..16].try_into().unwrap()),
            SET_FEATURES
        );
        let e = &got[32..];
        assert_eq!(
            u32::from_le_bytes(e[0..4].try_into().unwrap()),
            SET_VRING_ENABLE
        );
        assert_eq!(
            u32::from_le_bytes(e[4..8].try_into().unwrap()),
            FLAG_VERSION
        );
        // Replies flow back.
        back_peer
            .write_all(&msg(1, FLAG_VERSION | FLAG_REPLY, &[7; 8]))
            .unwrap();
        let mut r = [0u8; HDR + 8];
        front_peer.read_exact(&mut r).unwrap();
        assert_eq!(&r[HDR..], &[7; 8]);
        drop(front_peer);
        t.join().unwrap();
    }
}
