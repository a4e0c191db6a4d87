//! The guest's session kept outside the process (`--state-file`), so that
//! a daemon started after a crash serves the guest the dead one served.
//!
//! A FUSE session is state on both sides: the guest names files by the node
//! IDs it was given and open files by their handles, and never asks again.
//! A new daemon knows neither, so without this a backend restart leaves the
//! guest with a mount where every name it holds fails. The ledger records,
//! as they happen, each node the guest holds (its ID, reference count and
//! host file handle) and each open file (handle, node, open flags), plus
//! what INIT agreed, in a file mapped shared: every store lands in the page
//! cache at once, so a `kill -9` loses nothing. A daemon that finds a live
//! session there resolves the guest's IDs and handles from it when they
//! first come up, reopening the files by handle.
//!
//! Layout: a 4 KiB header, then `NODE_SLOTS` node slots of 128 bytes, then
//! `HANDLE_SLOTS` open-file slots of 32 bytes. The file is sparse: pages
//! exist only for slots used. A slot is in use while its first word (the
//! ID or handle, never 0) is set; it is written last and cleared first.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

const MAGIC: u64 = u64::from_le_bytes(*b"VFSFAST1");
const HEADER: usize = 4096;
/// Nodes the ledger can hold (more are served, but not kept).
const NODE_SLOTS: usize = 1 << 21;
const NODE_SLOT: usize = 128;
/// Room for a file handle in a node slot; larger ones are not kept.
pub const HANDLE_ROOM: usize = NODE_SLOT - 48;
const HANDLE_SLOTS: usize = 1 << 18;
const HANDLE_SLOT: usize = 32;
const NODES_AT: usize = HEADER;
const HANDLES_AT: usize = NODES_AT + NODE_SLOTS * NODE_SLOT;
const SIZE: usize = HANDLES_AT + HANDLE_SLOTS * HANDLE_SLOT;

// Header words.
const H_MAGIC: usize = 0;
const H_LIVE: usize = 8;
const H_AGREED: usize = 16;
const H_ROOT_DEV: usize = 24;
const H_ROOT_INO: usize = 32;
const H_NEXT_ID: usize = 40;
const H_NEXT_FH: usize = 48;
const H_NODE_HWM: usize = 56;
const H_HANDLE_HWM: usize = 64;

/// A node as the ledger keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: u64,
    pub refs: u64,
    pub dev: u64,
    pub ino: u64,
    pub kind: u32,
    pub handle_type: i32,
    pub handle: Vec<u8>,
}

/// An open file as the ledger keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandleRecord {
    pub fh: u64,
    pub node: u64,
    pub flags: i32,
}

/// What a new daemon found in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// Our own bits for what INIT agreed (see `share::Agreed`).
    pub agreed: u64,
    pub root: (u64, u64),
    pub next_id: u64,
    pub next_fh: u64,
    pub nodes: usize,
    pub handles: usize,
}

/// Slot bookkeeping for one table.
#[derive(Default)]
struct Slots {
    free: Vec<u32>,
    hwm: u32,
    /// ID (or handle) to slot, for what the previous daemon left and this
    /// one has not resolved yet.
    left: HashMap<u64, u32>,
}

pub struct Ledger {
    base: *mut u8,
    _file: File,
    nodes: Mutex<Slots>,
    handles: Mutex<Slots>,
}

// SAFETY: the mapping is only reached through atomics and through byte
// copies into slots that the `Slots` mutexes hand to one owner at a time.
unsafe impl Send for Ledger {}
// SAFETY: as above.
unsafe impl Sync for Ledger {}

impl Drop for Ledger {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), SIZE) };
    }
}

/// How long a daemon waits for the state file's lock: a predecessor that
/// was just killed lets go of it as soon as the kernel has reaped it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// One daemon per session: two writing one file would each corrupt the
/// other's. The lock goes with the process that holds it.
fn lock(file: &File, wait: std::time::Duration) -> io::Result<()> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "another virtiofsd-fast is using it; give each share its own state file",
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

impl Ledger {
    /// Open (or make) the ledger at `path`. Returns what a previous daemon
    /// left, if its guest session is still live.
    pub fn open(path: &Path) -> io::Result<(Ledger, Option<Resumed>)> {
        Self::open_waiting(path, LOCK_WAIT)
    }

    fn open_waiting(
        path: &Path,
        wait: std::time::Duration,
    ) -> io::Result<(Ledger, Option<Resumed>)> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        lock(&file, wait)?;
        if file.metadata()?.len() != SIZE as u64 {
            // New, or from another layout: start empty.
            file.set_len(0)?;
            file.set_len(SIZE as u64)?;
        }
        // SAFETY: a fresh shared mapping of the whole file, which is SIZE
        // bytes long; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let l = Ledger {
            base: base.cast(),
            _file: file,
            nodes: Mutex::new(Slots::default()),
            handles: Mutex::new(Slots::default()),
        };
        if l.word(H_MAGIC).load(Ordering::Acquire) != MAGIC {
            l.wipe();
            l.word(H_MAGIC).store(MAGIC, Ordering::Release);
            return Ok((l, None));
        }
        if l.word(H_LIVE).load(Ordering::Acquire) != 1 {
            l.wipe();
            return Ok((l, None));
        }
        let resumed = l.scan();
        Ok((l, Some(resumed)))
    }

    fn word(&self, at: usize) -> &AtomicU64 {
        debug_assert!(at % 8 == 0 && at + 8 <= SIZE);
        // SAFETY: in bounds of the mapping, 8-aligned (the mapping is
        // page-aligned), and only ever accessed atomically or by byte
        // copies into unpublished slots.
        unsafe { &*(self.base.add(at) as *const AtomicU64) }
    }

    fn word32(&self, at: usize) -> &AtomicU32 {
        debug_assert!(at % 4 == 0 && at + 4 <= SIZE);
        // SAFETY: as for `word`.
        unsafe { &*(self.base.add(at) as *const AtomicU32) }
    }

    fn node_at(slot: u32) -> usize {
        NODES_AT + slot as usize * NODE_SLOT
    }

    fn handle_at(slot: u32) -> usize {
        HANDLES_AT + slot as usize * HANDLE_SLOT
    }

    /// Index what the previous daemon left.
    fn scan(&self) -> Resumed {
        let mut nodes = self.nodes.lock().unwrap();
        let mut handles = self.handles.lock().unwrap();
        *nodes = self.index(H_NODE_HWM, NODE_SLOTS, Self::node_at);
        *handles = self.index(H_HANDLE_HWM, HANDLE_SLOTS, Self::handle_at);
        Resumed {
            agreed: self.word(H_AGREED).load(Ordering::Acquire),
            root: (
                self.word(H_ROOT_DEV).load(Ordering::Acquire),
                self.word(H_ROOT_INO).load(Ordering::Acquire),
            ),
            next_id: self.word(H_NEXT_ID).load(Ordering::Acquire),
            next_fh: self.word(H_NEXT_FH).load(Ordering::Acquire),
            nodes: nodes.left.len(),
            handles: handles.left.len(),
        }
    }

    /// One table's slots up to its high-water mark: free ones, and the
    /// ones in use by the key in their first word.
    fn index(&self, hwm_word: usize, cap: usize, at: fn(u32) -> usize) -> Slots {
        let hwm = (self.word(hwm_word).load(Ordering::Acquire) as usize).min(cap) as u32;
        let mut t = Slots {
            hwm,
            ..Slots::default()
        };
        for s in 0..hwm {
            match self.word(at(s)).load(Ordering::Acquire) {
                0 => t.free.push(s),
                key => {
                    t.left.insert(key, s);
                }
            }
        }
        t
    }

    /// Clear every slot in use and the header's session fields.
    fn wipe(&self) {
        let mut nodes = self.nodes.lock().unwrap();
        let mut handles = self.handles.lock().unwrap();
        self.word(H_LIVE).store(0, Ordering::Release);
        let node_hwm = (self.word(H_NODE_HWM).load(Ordering::Acquire) as usize).min(NODE_SLOTS);
        let handle_hwm =
            (self.word(H_HANDLE_HWM).load(Ordering::Acquire) as usize).min(HANDLE_SLOTS);
        // SAFETY: both ranges lie inside the mapping; no slot is in use by
        // this process while the tables' locks are held and emptied.
        unsafe {
            std::ptr::write_bytes(self.base.add(NODES_AT), 0, node_hwm * NODE_SLOT);
            std::ptr::write_bytes(self.base.add(HANDLES_AT), 0, handle_hwm * HANDLE_SLOT);
        }
        for w in [H_AGREED, H_ROOT_DEV, H_ROOT_INO, H_NEXT_ID, H_NEXT_FH] {
            self.word(w).store(0, Ordering::Relaxed);
        }
        self.word(H_NODE_HWM).store(0, Ordering::Release);
        self.word(H_HANDLE_HWM).store(0, Ordering::Release);
        *nodes = Slots::default();
        *handles = Slots::default();
    }

    /// A guest mounted (INIT): forget any earlier session and start this one.
    pub fn begin(&self, agreed: u64, root: (u64, u64)) {
        self.wipe();
        self.word(H_AGREED).store(agreed, Ordering::Relaxed);
        self.word(H_ROOT_DEV).store(root.0, Ordering::Relaxed);
        self.word(H_ROOT_INO).store(root.1, Ordering::Relaxed);
        self.word(H_LIVE).store(1, Ordering::Release);
    }

    /// Change what INIT agreed (bits the backend settles after the reply).
    pub fn set_agreed(&self, agreed: u64) {
        self.word(H_AGREED).store(agreed, Ordering::Release);
    }

    /// The guest unmounted: nothing to resume.
    pub fn end(&self) {
        self.wipe();
    }

    /// IDs up to `next` have been handed out.
    pub fn note_next_id(&self, next: u64) {
        self.word(H_NEXT_ID).fetch_max(next, Ordering::Relaxed);
    }

    pub fn note_next_fh(&self, next: u64) {
        self.word(H_NEXT_FH).fetch_max(next, Ordering::Relaxed);
    }

    fn take_slot(&self, slots: &mut Slots, cap: usize, hwm_word: usize) -> Option<u32> {
        if let Some(s) = slots.free.pop() {
            return Some(s);
        }
        if slots.hwm as usize >= cap {
            return None;
        }
        let s = slots.hwm;
        slots.hwm += 1;
        self.word(hwm_word)
            .store(u64::from(slots.hwm), Ordering::Release);
        Some(s)
    }

    /// Keep a node; returns its slot (None: the ledger is full or the
    /// handle does not fit, and the node will not survive a restart).
    pub fn add_node(&self, r: &NodeRecord) -> Option<u32> {
        if r.handle.len() > HANDLE_ROOM || r.id == 0 {
            return None;
        }
        let slot = {
            let mut nodes = self.nodes.lock().unwrap();
            self.take_slot(&mut nodes, NODE_SLOTS, H_NODE_HWM)?
        };
        let at = Self::node_at(slot);
        self.word(at + 8).store(r.refs, Ordering::Relaxed);
        self.word(at + 16).store(r.dev, Ordering::Relaxed);
        self.word(at + 24).store(r.ino, Ordering::Relaxed);
        self.word32(at + 32).store(r.kind, Ordering::Relaxed);
        self.word32(at + 36)
            .store(r.handle_type as u32, Ordering::Relaxed);
        self.word32(at + 40)
            .store(r.handle.len() as u32, Ordering::Relaxed);
        // SAFETY: the slot is this caller's (taken above, unpublished) and
        // the handle fits its room.
        unsafe {
            std::ptr::copy_nonoverlapping(r.handle.as_ptr(), self.base.add(at + 48), r.handle.len())
        };
        self.word(at).store(r.id, Ordering::Release);
        Some(slot)
    }

    pub fn set_refs(&self, slot: u32, refs: u64) {
        self.word(Self::node_at(slot) + 8)
            .store(refs, Ordering::Relaxed);
    }

    pub fn drop_node(&self, slot: u32) {
        self.word(Self::node_at(slot)).store(0, Ordering::Release);
        self.nodes.lock().unwrap().free.push(slot);
    }

    /// The record of a node the previous daemon left, claimed by the caller
    /// (its slot is now theirs: keep it with `slot` and drop it as usual).
    pub fn take_left_node(&self, id: u64) -> Option<(u32, NodeRecord)> {
        let slot = self.nodes.lock().unwrap().left.remove(&id)?;
        let at = Self::node_at(slot);
        let len = (self.word32(at + 40).load(Ordering::Relaxed) as usize).min(HANDLE_ROOM);
        let mut handle = vec![0u8; len];
        // SAFETY: in bounds of the slot; nothing writes it meanwhile.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(at + 48), handle.as_mut_ptr(), len) };
        let r = NodeRecord {
            id: self.word(at).load(Ordering::Acquire),
            refs: self.word(at + 8).load(Ordering::Relaxed),
            dev: self.word(at + 16).load(Ordering::Relaxed),
            ino: self.word(at + 24).load(Ordering::Relaxed),
            kind: self.word32(at + 32).load(Ordering::Relaxed),
            handle_type: self.word32(at + 36).load(Ordering::Relaxed) as i32,
            handle,
        };
        Some((slot, r))
    }

    /// Keep an open file; returns its slot.
    pub fn add_handle(&self, r: HandleRecord) -> Option<u32> {
        if r.fh == 0 {
            return None;
        }
        let slot = {
            let mut handles = self.handles.lock().unwrap();
            self.take_slot(&mut handles, HANDLE_SLOTS, H_HANDLE_HWM)?
        };
        let at = Self::handle_at(slot);
        self.word(at + 8).store(r.node, Ordering::Relaxed);
        self.word32(at + 16)
            .store(r.flags as u32, Ordering::Relaxed);
        self.word(at).store(r.fh, Ordering::Release);
        Some(slot)
    }

    pub fn drop_handle(&self, slot: u32) {
        self.word(Self::handle_at(slot)).store(0, Ordering::Release);
        self.handles.lock().unwrap().free.push(slot);
    }

    /// The record of an open file the previous daemon left, claimed by the
    /// caller as for `take_left_node`.
    pub fn take_left_handle(&self, fh: u64) -> Option<(u32, HandleRecord)> {
        let slot = self.handles.lock().unwrap().left.remove(&fh)?;
        let at = Self::handle_at(slot);
        Some((
            slot,
            HandleRecord {
                fh: self.word(at).load(Ordering::Acquire),
                node: self.word(at + 8).load(Ordering::Relaxed),
                flags: self.word32(at + 16).load(Ordering::Relaxed) as i32,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> NodeRecord {
        NodeRecord {
            id,
            refs: 3,
            dev: 7,
            ino: 1000 + id,
            kind: libc::S_IFREG,
            handle_type: 1,
            handle: vec![id as u8; 8],
        }
    }

    #[test]
    fn a_live_session_is_found_again_and_an_ended_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session");
        {
            let (l, resumed) = Ledger::open(&path).unwrap();
            assert_eq!(resumed, None, "a new file has no session");
            l.begin(0b101, (7, 2));
            let a = l.add_node(&record(10)).unwrap();
            let b = l.add_node(&record(11)).unwrap();
            l.add_node(&record(12)).unwrap();
            l.set_refs(a, 9);
            l.drop_node(b);
            l.note_next_id(13);
            let h = l.add_handle(HandleRecord {
                fh: 5,
                node: 10,
                flags: libc::O_RDWR,
            });
            assert!(h.is_some());
            l.note_next_fh(6);
            // Dropped without `end`, as a killed daemon would leave it.
        }
        let (l, resumed) = Ledger::open(&path).unwrap();
        let r = resumed.expect("the session is live");
        assert_eq!(
            (r.agreed, r.root, r.next_id, r.next_fh),
            (0b101, (7, 2), 13, 6)
        );
        assert_eq!((r.nodes, r.handles), (2, 1));
        let (_, n) = l.take_left_node(10).unwrap();
        assert_eq!(
            n,
            NodeRecord {
                refs: 9,
                ..record(10)
            }
        );
        assert!(l.take_left_node(11).is_none(), "dropped");
        assert!(l.take_left_node(10).is_none(), "claimed once");
        let (_, h) = l.take_left_handle(5).unwrap();
        assert_eq!((h.node, h.flags), (10, libc::O_RDWR));
        // A freed slot is used again before the table grows.
        let s = l.add_node(&record(20)).unwrap();
        assert_eq!(s, 1);
        l.end();
        drop(l);
        let (_, resumed) = Ledger::open(&path).unwrap();
        assert_eq!(resumed, None, "the guest unmounted");
    }

    #[test]
    fn one_daemon_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let (first, _) = Ledger::open(&path).unwrap();
        let e = Ledger::open_waiting(&path, std::time::Duration::from_millis(50))
            .err()
            .expect("the second is refused");
        assert!(e.to_string().contains("another virtiofsd-fast"), "{e}");
        drop(first);
        assert!(
            Ledger::open(&path).is_ok(),
            "free again once the first goes"
        );
    }

    #[test]
    fn a_new_mount_starts_empty_and_oversized_handles_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (l, _) = Ledger::open(&dir.path().join("s")).unwrap();
        l.begin(0, (1, 1));
        l.add_node(&record(10)).unwrap();
        let mut big = record(11);
        big.handle = vec![0; HANDLE_ROOM + 1];
        assert!(l.add_node(&big).is_none());
        l.begin(0, (1, 1));
        drop(l);
        let (l, r) = Ledger::open(&dir.path().join("s")).unwrap();
        assert_eq!(r.unwrap().nodes, 0);
        assert!(l.take_left_node(10).is_none());
    }
}
