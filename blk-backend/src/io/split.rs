//! Page-cache images: large reads are memory copies, so they go to a small
//! thread pool where several run on different CPUs at once; everything else
//! stays on the queue's io_uring, where a small copy costs less than the
//! hand-over to another thread. Both signal the same eventfd.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};

use super::threads::ThreadEngine;
use super::uring::UringEngine;
use super::{wait_readable, Engine, IoResult, Op};

pub struct SplitEngine {
    ring: UringEngine,
    pool: ThreadEngine,
    /// Reads of at least this many bytes go to the pool.
    pool_from: u64,
}

impl SplitEngine {
    /// `ring` for most operations, `threads` workers for reads of at least
    /// `pool_from` bytes.
    pub fn new(ring: UringEngine, threads: usize, name: &str, pool_from: u64) -> io::Result<Self> {
        // SAFETY: the ring's eventfd lives as long as the ring, which
        // outlives this borrow; the pool gets its own duplicate.
        let event = unsafe { BorrowedFd::borrow_raw(ring.notifier()) }.try_clone_to_owned()?;
        let pool = ThreadEngine::signalling(threads, name, event)?;
        Ok(SplitEngine {
            ring,
            pool,
            pool_from,
        })
    }

    fn to_pool(&self, op: &Op) -> bool {
        matches!(op, Op::Read { iov, .. } if iov.total() >= self.pool_from)
    }
}

impl Engine for SplitEngine {
    fn push(&mut self, token: u64, op: Op) -> io::Result<()> {
        if self.to_pool(&op) {
            self.pool.push(token, op)
        } else {
            self.ring.push(token, op)
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        self.pool.submit()?;
        self.ring.submit()
    }

    fn reap(&mut self, out: &mut Vec<(u64, IoResult)>) {
        self.pool.reap(out);
        self.ring.reap(out);
    }

    fn notifier(&self) -> RawFd {
        self.ring.notifier()
    }

    fn wait(&mut self) -> io::Result<()> {
        self.pool.submit()?;
        // Cleared before looking: a completion posted after this point
        // signals again, so the poll below cannot miss it.
        self.clear_notifier();
        if self.pool.has_completions() || self.ring.has_completions() {
            return Ok(());
        }
        self.ring.enter()?;
        if self.ring.has_completions() {
            return Ok(());
        }
        wait_readable(self.notifier())
    }

    fn name(&self) -> &'static str {
        "io_uring with a copy pool"
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn does_what_the_other_engines_do() {
        let Ok(ring) = super::UringEngine::new(128) else {
            eprintln!("skipped: io_uring refused on this host");
            return;
        };
        // The exercise's 8 KiB reads go to the pool, its 512-byte reads
        // and every other operation to the ring.
        let mut e = super::SplitEngine::new(ring, 2, "test", 4096).unwrap();
        super::super::tests::exercise(&mut e);
    }
}
