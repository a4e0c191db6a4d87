//! The io_uring engine: one ring per queue, many operations in flight, and
//! completions signalled through an eventfd registered with the ring.
//!
//! The ring is locked down before it is used (IORING_REGISTER_RESTRICTIONS,
//! as net-backend's transmit ring is): it accepts READV, WRITEV, FSYNC and
//! FALLOCATE only, and only on the image's own descriptors, registered with
//! it; no register operation is allowed once it runs. Seccomp cannot see
//! io_uring operations, so without this a compromised process could open,
//! read or connect anything through the ring.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use io_uring::{opcode, register::Restriction, squeue, types, IoUring};

use super::{eventfd, wait_readable, Engine, IoResult, Op};

pub struct UringEngine {
    ring: IoUring,
    event: OwnedFd,
    /// Operations in flight, by slot; the user data of an SQE is its slot.
    /// Each keeps its iovec list alive until the completion arrives.
    slots: Vec<Option<(u64, Op)>>,
    free: Vec<usize>,
    /// The descriptors registered with the ring: an operation names one by
    /// its index here, and can name no other.
    files: Vec<RawFd>,
    /// Operations on a descriptor the ring was not given, answered EBADF
    /// without reaching it; their results wait for the next reap.
    refused: Vec<(u64, IoResult)>,
}

impl UringEngine {
    /// A ring for up to `depth` operations in flight on `files` (the
    /// image's descriptors) and nothing else.
    pub fn new(depth: u32, files: &[RawFd]) -> io::Result<Self> {
        let cq = depth.saturating_mul(2).max(8);
        // Completions wait for this thread's next trip into the kernel
        // instead of interrupting it (an IPI per completion otherwise);
        // the flag in the ring tells the polling loop when to make that
        // trip. A sleeping thread is still woken. Kernels before 5.19 lack
        // both: plain ring then.
        let build = |coop: bool| {
            let mut b = IoUring::builder();
            b.setup_cqsize(cq).setup_r_disabled();
            if coop {
                b.setup_coop_taskrun().setup_taskrun_flag();
            }
            b.build(depth.max(4))
        };
        let ring = build(true).or_else(|_| build(false))?;
        let event = eventfd()?;
        let s = ring.submitter();
        s.register_eventfd(event.as_raw_fd())?;
        if !files.is_empty() {
            s.register_files(files)?;
        }
        s.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_op(opcode::Fallocate::CODE),
            Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()),
        ])?;
        s.register_enable_rings()?;
        Ok(UringEngine {
            ring,
            event,
            slots: Vec::new(),
            free: Vec::new(),
            files: files.to_vec(),
            refused: Vec::new(),
        })
    }

    /// Whether completions wait in the ring.
    pub fn has_completions(&mut self) -> bool {
        !self.refused.is_empty() || !self.ring.completion().is_empty()
    }

    /// Submit what is queued, and run the completions the kernel holds as
    /// task work.
    pub(crate) fn enter(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: the caller reaps, then
                // submits again on the next event.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// The ring's entry for `op`, naming its descriptor by registered
    /// index (None: the ring was not given that descriptor).
    fn entry(&self, op: &Op) -> Option<squeue::Entry> {
        let fd = match op {
            Op::Read { fd, .. } | Op::Write { fd, .. } | Op::Sync { fd } => *fd,
            Op::Fallocate { fd, .. } => *fd,
        };
        let file = types::Fixed(self.files.iter().position(|&f| f == fd)? as u32);
        Some(match op {
            Op::Read { iov, offset, .. } => {
                opcode::Readv::new(file, iov.0.as_ptr(), iov.0.len() as u32)
                    .offset(*offset)
                    .build()
            }
            Op::Write { iov, offset, .. } => {
                opcode::Writev::new(file, iov.0.as_ptr(), iov.0.len() as u32)
                    .offset(*offset)
                    .build()
            }
            Op::Sync { .. } => opcode::Fsync::new(file)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate {
                mode, offset, len, ..
            } => opcode::Fallocate::new(file, *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
        })
    }
}

impl Engine for UringEngine {
    fn push(&mut self, token: u64, op: Op) -> io::Result<()> {
        let Some(entry) = self.entry(&op) else {
            self.refused.push((token, -i64::from(libc::EBADF)));
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte eventfd write from a local buffer.
            unsafe { libc::write(self.event.as_raw_fd(), one.as_ptr().cast(), 8) };
            return Ok(());
        };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let entry = entry.user_data(slot as u64);
        self.slots[slot] = Some((token, op));
        loop {
            // SAFETY: the entry's buffers (the iovec list and the guest
            // memory it points to) live in `self.slots[slot]` and in the
            // request until the completion for this slot is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // The submission queue is full: hand it to the kernel first.
            if let Err(e) = self.ring.submit() {
                self.slots[slot] = None;
                self.free.push(slot);
                return Err(e);
            }
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            // Nothing pushed since the last submission: no system call.
            return Ok(());
        }
        self.enter()
    }

    fn reap(&mut self, out: &mut Vec<(u64, IoResult)>) {
        out.append(&mut self.refused);
        // Completions the kernel holds as task work are posted by an enter.
        if self.ring.submission().taskrun() {
            let _ = self.enter();
        }
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            if let Some((token, _op)) = self.slots.get_mut(slot).and_then(Option::take) {
                self.free.push(slot);
                out.push((token, i64::from(cqe.result())));
            }
        }
    }

    fn notifier(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    fn wait(&mut self) -> io::Result<()> {
        self.clear_notifier();
        if !self.refused.is_empty() || !self.ring.completion().is_empty() {
            return Ok(());
        }
        self.enter()?;
        wait_readable(self.event.as_raw_fd())
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn does_what_the_thread_pool_does() {
        let f = super::super::tests::scratch();
        match UringEngine::new(128, &[f.as_raw_fd()]) {
            Ok(mut e) => super::super::tests::exercise(&mut e, f.as_raw_fd()),
            Err(e) => {
                ::tests::require::<()>(Err(format!("io_uring refused here: {e}")));
            }
        }
    }

    /// What the ring itself takes: its four operations on its registered
    /// files, and nothing else (seccomp cannot see io_uring operations).
    #[test]
    fn the_ring_refuses_other_operations_and_other_files() {
        let f = super::super::tests::scratch();
        f.set_len(8192).unwrap();
        let other = super::super::tests::scratch();
        let mut e = match UringEngine::new(8, &[f.as_raw_fd()]) {
            Ok(e) => e,
            Err(e) => {
                ::tests::require::<()>(Err(format!("io_uring refused here: {e}")));
                return;
            }
        };
        let mut buf = [0u8; 512];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let run = |e: &mut UringEngine, entry: squeue::Entry| -> i32 {
            // SAFETY: the buffers the entries name live until the
            // completion, which this waits for.
            unsafe { e.ring.submission().push(&entry.user_data(7)) }.unwrap();
            e.ring.submit_and_wait(1).unwrap();
            let c = e.ring.completion().next().unwrap();
            c.result()
        };
        let eacces = -libc::EACCES;
        let openat = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c"/etc/passwd".as_ptr())
            .flags(libc::O_RDONLY)
            .build();
        assert_eq!(run(&mut e, openat), eacces, "OPENAT passed");
        let plain = opcode::Readv::new(types::Fd(other.as_raw_fd()), iov.as_ptr(), 1).build();
        assert_eq!(
            run(&mut e, plain),
            eacces,
            "a READV on an unregistered file passed"
        );
        let read = opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), 512).build();
        assert_eq!(run(&mut e, read), eacces, "READ passed");
        let fixed = opcode::Readv::new(types::Fixed(0), iov.as_ptr(), 1).build();
        assert_eq!(run(&mut e, fixed), 512, "its own READV was refused");
        // And the engine answers EBADF for a descriptor it was not given.
        let mut out = Vec::new();
        e.push(
            9,
            Op::Sync {
                fd: other.as_raw_fd(),
            },
        )
        .unwrap();
        e.wait().unwrap();
        e.reap(&mut out);
        assert_eq!(out, vec![(9, -i64::from(libc::EBADF))]);
    }
}
