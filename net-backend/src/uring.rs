//! Transmit batches through io_uring: one `io_uring_enter` hands a whole
//! batch of frames to a tap queue, where `writev` costs a syscall per
//! frame (the bulk of what separates the backend from a plain loop on the
//! tap; see BENCHMARKS.md).
//!
//! The ring is locked down before it is used: it accepts WRITEV only, and
//! only on the one file registered with it (the tap queue), so it gives a
//! compromised process nothing beyond what `writev` on that tap gives.
//! io_uring operations are not seen by seccomp, which is why that matters.

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, register::Restriction, squeue, types, IoUring};

/// A ring that writes frames to one tap queue.
pub struct TxRing {
    ring: IoUring,
}

impl TxRing {
    /// Frames in one submission at most.
    pub const DEPTH: usize = 64;

    /// A ring for `fd`, restricted to WRITEV on it. The kernel writes each
    /// frame within the submitting call (no worker threads). A file that
    /// cannot take RWF_NOWAIT answers EOPNOTSUPP for every frame; the
    /// caller then sends them another way.
    pub fn new(fd: RawFd) -> io::Result<Self> {
        let depth = Self::DEPTH as u32;
        // Completions wait for this thread's next trip into the kernel
        // instead of interrupting it; kernels before 5.19 lack the flag.
        let ring = IoUring::builder()
            .setup_r_disabled()
            .setup_coop_taskrun()
            .build(depth)
            .or_else(|_| IoUring::builder().setup_r_disabled().build(depth))?;
        let s = ring.submitter();
        s.register_files(&[fd])?;
        s.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
        ])?;
        s.register_enable_rings()?;
        Ok(TxRing { ring })
    }

    /// Write frames to the tap, each a range of `iov`, and wait for all of
    /// them. Each frame's result is pushed on `out`, in order. An error
    /// means the ring itself failed (the frames of this call not written
    /// are reported as errors too); the caller should stop using it.
    pub fn write(
        &mut self,
        iov: &[libc::iovec],
        frames: &[Range<usize>],
        out: &mut Vec<io::Result<usize>>,
    ) -> io::Result<()> {
        for chunk in frames.chunks(Self::DEPTH) {
            self.write_chunk(iov, chunk, out)?;
        }
        Ok(())
    }

    fn write_chunk(
        &mut self,
        iov: &[libc::iovec],
        frames: &[Range<usize>],
        out: &mut Vec<io::Result<usize>>,
    ) -> io::Result<()> {
        let base = out.len();
        out.extend(
            frames
                .iter()
                .map(|_| Err(io::Error::other("not written: the transmit ring failed"))),
        );
        {
            let mut sq = self.ring.submission();
            for (i, r) in frames.iter().enumerate() {
                let v = &iov[r.clone()];
                // RWF_NOWAIT: a full file answers EAGAIN (the frame is
                // dropped, as writev on the O_NONBLOCK tap does) instead
                // of the ring parking the write until there is room.
                let e = opcode::Writev::new(types::Fixed(0), v.as_ptr(), v.len() as u32)
                    .rw_flags(libc::RWF_NOWAIT)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the iovecs (and the guest memory they point at)
                // stay valid until the completions, which this call waits
                // for; the kernel copies the iovec array when it issues.
                unsafe { sq.push(&e) }
                    .map_err(|_| io::Error::other("the transmit ring's queue is full"))?;
            }
        }
        let mut left = frames.len();
        while left > 0 {
            match self.ring.submit_and_wait(left) {
                Ok(_) => {}
                // Interrupted, or out of completion room: reap and retry.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e),
            }
            for c in self.ring.completion() {
                let Some(slot) = out.get_mut(base + c.user_data() as usize) else {
                    continue;
                };
                *slot = match c.result() {
                    n if n >= 0 => Ok(n as usize),
                    e => Err(io::Error::from_raw_os_error(-e)),
                };
                left -= 1;
            }
        }
        Ok(())
    }
}

impl AsRawFd for TxRing {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors that we then own.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) };
        assert_eq!(rc, 0);
        // SAFETY: just created, owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// A ring on `fd`, or None (said) where the kernel refuses one.
    fn ring_on(fd: &OwnedFd) -> Option<TxRing> {
        TxRing::new(fd.as_raw_fd())
            .map_err(|e| {
                backend_common::skip_or_fail(&format!(
                    "this kernel refuses a restricted io_uring ({e})"
                ))
            })
            .ok()
    }

    fn iov(b: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_ptr() as *mut _,
            iov_len: b.len(),
        }
    }

    fn read_all(fd: &OwnedFd) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        // SAFETY: reading into our buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        buf.truncate(n.max(0) as usize);
        buf
    }

    #[test]
    fn a_batch_is_written_in_order_with_each_result() {
        let (r, w) = pipe();
        let Some(mut ring) = ring_on(&w) else {
            return;
        };
        let (a, b, c) = (b"one ".to_vec(), b"two ".to_vec(), b"three".to_vec());
        let v = [iov(&a), iov(&b[..2]), iov(&b[2..]), iov(&c)];
        let mut out = Vec::new();
        ring.write(&v, &[0..1, 1..3, 3..4], &mut out).unwrap();
        let lens: Vec<usize> = out.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(lens, [4, 4, 5]);
        assert_eq!(read_all(&r), b"one two three");
        // More frames than the ring holds go in several submissions.
        let many: Vec<Range<usize>> = (0..150).map(|_| 0..1).collect();
        let x = [iov(b"x")];
        let mut out = Vec::new();
        ring.write(&x, &many, &mut out).unwrap();
        assert_eq!(out.len(), 150);
        assert!(out.iter().all(|r| matches!(r, Ok(1))));
        assert_eq!(read_all(&r), vec![b'x'; 150]);
    }

    #[test]
    fn a_full_file_answers_eagain_per_frame() {
        let (_r, w) = pipe();
        let Some(mut ring) = ring_on(&w) else {
            return;
        };
        let big = vec![7u8; 64 * 1024];
        let v = [iov(&big)];
        let mut out = Vec::new();
        // A pipe holds 64 KiB: the first write fills it, the rest would
        // block, and O_NONBLOCK turns that into EAGAIN, not a wait.
        ring.write(&v, &[0..1, 0..1, 0..1], &mut out).unwrap();
        assert!(matches!(out[0], Ok(n) if n > 0));
        assert_eq!(
            out[2].as_ref().unwrap_err().raw_os_error(),
            Some(libc::EAGAIN)
        );
    }

    #[test]
    fn the_ring_does_nothing_but_write_to_its_file() {
        let (r, w) = pipe();
        let Some(mut ring) = ring_on(&w) else {
            return;
        };
        let mut buf = [0u8; 8];
        let v = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let refused = |ring: &mut TxRing, e: squeue::Entry| {
            // SAFETY: `buf` outlives the wait below.
            unsafe { ring.ring.submission().push(&e.user_data(9)).unwrap() };
            ring.ring.submit_and_wait(1).unwrap();
            let c = ring.ring.completion().next().unwrap();
            c.result()
        };
        // Another opcode on the tap's slot: refused.
        let read = opcode::Readv::new(types::Fixed(0), v.as_ptr(), 1).build();
        assert_eq!(refused(&mut ring, read), -libc::EACCES);
        // WRITEV, but on a descriptor rather than the registered file.
        let other = opcode::Writev::new(types::Fd(r.as_raw_fd()), v.as_ptr(), 1).build();
        assert_eq!(refused(&mut ring, other), -libc::EACCES);
        // Nor can more files be registered.
        assert!(ring
            .ring
            .submitter()
            .register_files(&[r.as_raw_fd()])
            .is_err());
        // What it is for still works.
        let mut out = Vec::new();
        let one = std::iter::once(0..1).collect::<Vec<_>>();
        ring.write(&[iov(b"ok")], &one, &mut out).unwrap();
        assert!(matches!(out[0], Ok(2)));
    }
}
