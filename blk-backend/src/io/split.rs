//! Page-cache images: large reads are memory copies, so when several are
//! wanted at once they go to a small thread pool where they run on
//! different CPUs together; everything else stays on the queue's io_uring,
//! where a copy costs less than the hand-over to another thread. A lone
//! large read (nothing else large queued or in the pool) stays on the ring
//! too: at queue depth 1 the hand-over doubled its latency. Both signal the
//! same eventfd.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};

use super::threads::ThreadEngine;
use super::uring::UringEngine;
use super::{wait_readable, Engine, IoResult, Op};

pub struct SplitEngine {
    ring: UringEngine,
    pool: ThreadEngine,
    /// Reads of at least this many bytes may go to the pool.
    pool_from: u64,
    /// Large reads pushed since the last submission.
    large_queued: usize,
    /// Operations handed to the pool and not yet reaped.
    pool_in_flight: usize,
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
            large_queued: 0,
            pool_in_flight: 0,
        })
    }

    /// Whether `op` goes to the pool: a large read with company.
    fn goes_to_pool(&mut self, op: &Op) -> bool {
        if !matches!(op, Op::Read { iov, .. } if iov.total() >= self.pool_from) {
            return false;
        }
        self.large_queued += 1;
        self.large_queued > 1 || self.pool_in_flight > 0
    }
}

impl Engine for SplitEngine {
    fn push(&mut self, token: u64, op: Op) -> io::Result<()> {
        if self.goes_to_pool(&op) {
            self.pool.push(token, op)?;
            self.pool_in_flight += 1;
            Ok(())
        } else {
            self.ring.push(token, op)
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        self.large_queued = 0;
        // The pool first: its threads copy while this one makes the ring's.
        self.pool.submit()?;
        self.ring.submit()
    }

    fn reap(&mut self, out: &mut Vec<(u64, IoResult)>) {
        let before = out.len();
        self.pool.reap(out);
        self.pool_in_flight = self.pool_in_flight.saturating_sub(out.len() - before);
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
        let f = super::super::tests::scratch();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let ring =
            super::UringEngine::new(128, &[fd]).map_err(|e| format!("io_uring refused: {e}"));
        let Some(ring) = tests::require(ring) else {
            return;
        };
        // The exercise's single reads stay on the ring; of its 64 reads
        // in one burst the first does too and 63 go to the pool.
        let mut e = super::SplitEngine::new(ring, 2, "test", 512).unwrap();
        super::super::tests::exercise(&mut e, fd);
    }

    /// A lone large read stays on the ring; one with company goes to the
    /// pool, and so does the next while the pool is busy.
    #[test]
    fn only_large_reads_with_company_go_to_the_pool() {
        let ring = super::UringEngine::new(16, &[]).map_err(|e| format!("io_uring refused: {e}"));
        let Some(ring) = tests::require(ring) else {
            return;
        };
        let mut e = super::SplitEngine::new(ring, 2, "test", 4096).unwrap();
        let read = |len: usize| super::Op::Read {
            fd: -1,
            iov: super::super::IoVecs(vec![libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: len,
            }]),
            offset: 0,
        };
        assert!(!e.goes_to_pool(&read(512)));
        assert!(!e.goes_to_pool(&read(8192)), "alone: the ring");
        assert!(e.goes_to_pool(&read(8192)), "second in the burst: the pool");
        e.large_queued = 0;
        assert!(!e.goes_to_pool(&read(8192)), "alone again");
        e.large_queued = 0;
        e.pool_in_flight = 1;
        assert!(e.goes_to_pool(&read(8192)), "the pool still busy");
        assert!(!e.goes_to_pool(&super::Op::Sync { fd: -1 }));
    }
}
