//! I/O engines: start operations on the image, learn later how they ended.
//!
//! Each request queue owns one engine, used only by that queue's thread, so
//! nothing on the data path is shared between queues. An engine signals an
//! eventfd when completions are ready; the queue thread has it in its epoll
//! set next to the queue's kick.

pub mod bounce;
pub mod split;
pub mod threads;
pub mod uring;

use std::io;
use std::os::fd::RawFd;

/// A list of host buffers for preadv/pwritev.
///
/// The pointers lead into guest memory that the request holding this list
/// keeps mapped until the operation has completed.
#[derive(Debug, Clone, Default)]
pub struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the iovecs are plain addresses; the memory they point to is kept
// alive by the owning request (an Arc of the guest memory map) until the
// engine reports the operation complete, whichever thread does the I/O.
unsafe impl Send for IoVecs {}

impl IoVecs {
    pub fn total(&self) -> u64 {
        self.0.iter().map(|v| v.iov_len as u64).sum()
    }

    /// Drop the first `n` bytes (after a short transfer).
    pub fn advance(&mut self, mut n: usize) {
        let mut skip = 0;
        for v in self.0.iter_mut() {
            if n == 0 {
                break;
            }
            if n >= v.iov_len {
                n -= v.iov_len;
                skip += 1;
            } else {
                // SAFETY: stays inside the same buffer, n < iov_len.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
        self.0.drain(..skip);
    }
}

/// One operation on the image.
#[derive(Debug, Clone)]
pub enum Op {
    Read {
        fd: RawFd,
        iov: IoVecs,
        offset: u64,
    },
    Write {
        fd: RawFd,
        iov: IoVecs,
        offset: u64,
    },
    /// fdatasync.
    Sync {
        fd: RawFd,
    },
    Fallocate {
        fd: RawFd,
        mode: i32,
        offset: u64,
        len: u64,
    },
}

/// How an operation ended: bytes transferred, or a negative errno.
pub type IoResult = i64;

/// An I/O engine for one queue.
pub trait Engine: Send {
    /// Queue `op`; `token` comes back with its result. The buffers of `op`
    /// must stay valid until then (the engine keeps its own copy of the
    /// iovec list).
    fn push(&mut self, token: u64, op: Op) -> io::Result<()>;
    /// Start everything pushed so far.
    fn submit(&mut self) -> io::Result<()>;
    /// Take the completions that are ready (no system call for io_uring).
    fn reap(&mut self, out: &mut Vec<(u64, IoResult)>);
    /// Readable when completions may be ready.
    fn notifier(&self) -> RawFd;
    /// Reset the notifier, before reaping what woke it.
    fn clear_notifier(&self) {
        drain_eventfd(self.notifier());
    }
    /// Block until at least one completion is ready (for draining).
    fn wait(&mut self) -> io::Result<()>;
    /// Which engine this is, for logs.
    fn name(&self) -> &'static str;
}

/// Do `op` right here, synchronously (the thread-pool engine's workers).
pub fn run_sync(op: &Op) -> IoResult {
    // SAFETY: in every arm the descriptor is the image's, open for the
    // process lifetime; the iovecs point to guest memory kept mapped by the
    // request until this result is reported; counts fit, as requests are
    // limited to MAX_IOVECS buffers.
    let rc: i64 = unsafe {
        match op {
            Op::Read { fd, iov, offset } => libc::preadv(
                *fd,
                iov.0.as_ptr(),
                iov.0.len() as libc::c_int,
                *offset as libc::off_t,
            ) as i64,
            Op::Write { fd, iov, offset } => libc::pwritev(
                *fd,
                iov.0.as_ptr(),
                iov.0.len() as libc::c_int,
                *offset as libc::off_t,
            ) as i64,
            Op::Sync { fd } => i64::from(libc::fdatasync(*fd)),
            Op::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => i64::from(libc::fallocate(
                *fd,
                *mode,
                *offset as libc::off_t,
                *len as libc::off_t,
            )),
        }
    };
    if rc < 0 {
        -i64::from(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    } else {
        rc
    }
}

/// A non-blocking eventfd.
pub(crate) fn eventfd() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Clear an eventfd's counter.
pub(crate) fn drain_eventfd(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a u64; a non-blocking eventfd at zero
    // answers EAGAIN, which is fine.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// Wait until `fd` is readable.
pub(crate) fn wait_readable(fd: RawFd) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, -1) };
        if rc >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_across_buffers() {
        let mut a = [0u8; 100];
        let mut b = [0u8; 50];
        let mut v = IoVecs(vec![
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 100,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 50,
            },
        ]);
        v.advance(30);
        assert_eq!(v.total(), 120);
        v.advance(80);
        assert_eq!(v.0.len(), 1);
        assert_eq!(v.0[0].iov_len, 40);
        assert_eq!(v.0[0].iov_base, b[10..].as_mut_ptr().cast());
    }

    /// Both engines do the same operations with the same results.
    /// A scratch file for an engine to work on.
    pub(crate) fn scratch() -> std::fs::File {
        tempfile::tempfile().unwrap()
    }

    /// What every engine must do, on `fd` (a scratch file it was given).
    pub(crate) fn exercise(engine: &mut dyn Engine, fd: RawFd) {
        let mut data = vec![7u8; 8192];
        let mut back = vec![0u8; 8192];
        let iov = |buf: &mut [u8]| {
            IoVecs(vec![libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }])
        };
        let run = |engine: &mut dyn Engine, token: u64, op: Op| -> IoResult {
            engine.push(token, op).unwrap();
            engine.submit().unwrap();
            let mut out = Vec::new();
            while out.is_empty() {
                engine.wait().unwrap();
                engine.reap(&mut out);
            }
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].0, token);
            out[0].1
        };
        let w = Op::Write {
            fd,
            iov: iov(&mut data),
            offset: 4096,
        };
        assert_eq!(run(engine, 1, w), 8192);
        assert_eq!(run(engine, 2, Op::Sync { fd }), 0);
        let r = Op::Read {
            fd,
            iov: iov(&mut back),
            offset: 4096,
        };
        assert_eq!(run(engine, 3, r), 8192);
        assert_eq!(back, data);
        let punch = Op::Fallocate {
            fd,
            mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset: 4096,
            len: 4096,
        };
        assert_eq!(run(engine, 4, punch), 0);
        let r = Op::Read {
            fd,
            iov: iov(&mut back),
            offset: 4096,
        };
        assert_eq!(run(engine, 5, r), 8192);
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..].iter().all(|&b| b == 7));
        // A bad descriptor is an error result, not a failure of the engine.
        assert_eq!(run(engine, 6, Op::Sync { fd: -1 }), -i64::from(libc::EBADF));
        // Many in flight at once.
        for t in 0..64u64 {
            let r = Op::Read {
                fd,
                iov: iov(&mut back[..512]),
                offset: 4096 + t * 8,
            };
            engine.push(100 + t, r).unwrap();
        }
        engine.submit().unwrap();
        let mut out = Vec::new();
        while out.len() < 64 {
            engine.wait().unwrap();
            engine.reap(&mut out);
        }
        let mut tokens: Vec<u64> = out.iter().map(|c| c.0).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, (100..164).collect::<Vec<_>>());
        assert!(out.iter().all(|c| c.1 == 512));
    }
}
