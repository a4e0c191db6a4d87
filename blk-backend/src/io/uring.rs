//! The io_uring engine: one ring per queue, many operations in flight, and
//! completions signalled through an eventfd registered with the ring.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};

use super::{eventfd, wait_readable, Engine, IoResult, Op};

pub struct UringEngine {
    ring: IoUring,
    event: OwnedFd,
    /// Operations in flight, by slot; the user data of an SQE is its slot.
    /// Each keeps its iovec list alive until the completion arrives.
    slots: Vec<Option<(u64, Op)>>,
    free: Vec<usize>,
}

impl UringEngine {
    /// A ring for up to `depth` operations in flight.
    pub fn new(depth: u32) -> io::Result<Self> {
        let cq = depth.saturating_mul(2).max(8);
        // Completions wait for this thread's next trip into the kernel
        // instead of interrupting it (an IPI per completion otherwise);
        // the flag in the ring tells the polling loop when to make that
        // trip. A sleeping thread is still woken. Kernels before 5.19 lack
        // both: plain ring then.
        let ring = IoUring::builder()
            .setup_cqsize(cq)
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(depth.max(4))
            .or_else(|_| IoUring::builder().setup_cqsize(cq).build(depth.max(4)))?;
        let event = eventfd()?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(UringEngine {
            ring,
            event,
            slots: Vec::new(),
            free: Vec::new(),
        })
    }

    /// Whether completions wait in the ring.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
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

    fn entry(op: &Op) -> squeue::Entry {
        match op {
            Op::Read { fd, iov, offset } => {
                opcode::Readv::new(types::Fd(*fd), iov.0.as_ptr(), iov.0.len() as u32)
                    .offset(*offset)
                    .build()
            }
            Op::Write { fd, iov, offset } => {
                opcode::Writev::new(types::Fd(*fd), iov.0.as_ptr(), iov.0.len() as u32)
                    .offset(*offset)
                    .build()
            }
            Op::Sync { fd } => opcode::Fsync::new(types::Fd(*fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => opcode::Fallocate::new(types::Fd(*fd), *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
        }
    }
}

impl Engine for UringEngine {
    fn push(&mut self, token: u64, op: Op) -> io::Result<()> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let entry = Self::entry(&op).user_data(slot as u64);
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
        if !self.ring.completion().is_empty() {
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
    #[test]
    fn does_what_the_thread_pool_does() {
        match super::UringEngine::new(128) {
            Ok(mut e) => super::super::tests::exercise(&mut e),
            Err(e) => println!("SKIPPED: io_uring refused here: {e}"),
        }
    }
}
