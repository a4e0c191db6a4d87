//! The thread-pool engine, for hosts that refuse io_uring: a few threads per
//! queue doing the synchronous calls, so a slow flush does not hold up the
//! reads queued behind it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use super::{eventfd, run_sync, wait_readable, Engine, IoResult, Op};

struct Shared {
    done: Mutex<Vec<(u64, IoResult)>>,
    event: OwnedFd,
}

pub struct ThreadEngine {
    jobs: Option<Sender<(u64, Op)>>,
    pending: Vec<(u64, Op)>,
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl ThreadEngine {
    pub fn new(threads: usize, name: &str) -> io::Result<Self> {
        Self::signalling(threads, name, eventfd()?)
    }

    /// A pool that signals `event` when completions are ready (an eventfd
    /// it may share with another engine).
    pub fn signalling(threads: usize, name: &str, event: OwnedFd) -> io::Result<Self> {
        let (tx, rx) = channel::<(u64, Op)>();
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared {
            done: Mutex::new(Vec::new()),
            event,
        });
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            let shared = Arc::clone(&shared);
            workers.push(
                std::thread::Builder::new()
                    .name(format!("{name}-io{i}"))
                    .spawn(move || worker(&rx, &shared))?,
            );
        }
        Ok(ThreadEngine {
            jobs: Some(tx),
            pending: Vec::new(),
            shared,
            workers,
        })
    }

    /// Whether finished operations wait to be reaped.
    pub fn has_completions(&self) -> bool {
        self.shared
            .done
            .lock()
            .map(|d| !d.is_empty())
            .unwrap_or(false)
    }
}

fn worker(rx: &Mutex<Receiver<(u64, Op)>>, shared: &Shared) {
    loop {
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        let Ok((token, op)) = job else { return };
        let res = run_sync(&op);
        if let Ok(mut d) = shared.done.lock() {
            d.push((token, res));
        }
        let one = 1u64;
        // SAFETY: writes 8 bytes from a u64 to our eventfd.
        unsafe { libc::write(shared.event.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

impl Engine for ThreadEngine {
    fn push(&mut self, token: u64, op: Op) -> io::Result<()> {
        self.pending.push((token, op));
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(tx) = &self.jobs else {
            return Err(io::Error::other("the I/O threads have stopped"));
        };
        for job in self.pending.drain(..) {
            tx.send(job)
                .map_err(|_| io::Error::other("the I/O threads have stopped"))?;
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<(u64, IoResult)>) {
        if let Ok(mut d) = self.shared.done.lock() {
            out.append(&mut d);
        }
    }

    fn notifier(&self) -> RawFd {
        self.shared.event.as_raw_fd()
    }

    fn wait(&mut self) -> io::Result<()> {
        self.submit()?;
        self.clear_notifier();
        if self.has_completions() {
            return Ok(());
        }
        wait_readable(self.shared.event.as_raw_fd())
    }

    fn name(&self) -> &'static str {
        "threads"
    }
}

impl Drop for ThreadEngine {
    fn drop(&mut self) {
        // Closing the channel ends the workers once the queue is empty.
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn does_what_io_uring_does() {
        let mut e = super::ThreadEngine::new(3, "test").unwrap();
        let f = super::super::tests::scratch();
        super::super::tests::exercise(&mut e, std::os::fd::AsRawFd::as_raw_fd(&f));
    }
}
