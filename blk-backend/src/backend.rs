//! The vhost-user side: requests from the queues to the I/O engines, and
//! completions back to the used rings.
//!
//! Queue q has its own worker thread, engine and in-flight table; nothing
//! on the data path is shared between queues. A request goes:
//! kick → parse and check ([`crate::request`]) → an [`Op`] pushed to the
//! queue's engine → completion (reaped right after submission, or when the
//! engine's eventfd fires) → status byte, used ring, interrupt.
//!
//! Every request taken from the avail ring sits in the queue's in-flight
//! table, by descriptor head, until its used entry is written. That table is
//! what crash-safe reconnect needs to resubmit (see the notes on the
//! vhost-user inflight area in the README).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backend_common::FaultCounter;
use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::io::{bounce, Engine, IoResult, IoVecs, Op};
use crate::request::{self, status, Desc, Geometry, Plan, Segment};

/// Feature bits (virtio 1.2, 5.2.3).
pub mod feature {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const TOPOLOGY: u64 = 1 << 10;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Largest data segment the driver may use (VIRTIO_BLK_F_SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data segments per request (VIRTIO_BLK_F_SEG_MAX), leaving room in
/// the iovec limit for buffers that cross a memory-region boundary.
pub const SEG_MAX: u32 = 254;
/// Zeros for write-zeroes where the filesystem cannot zero a range.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The image and what the guest is told about it.
pub struct Disk {
    /// The image, opened with O_DIRECT when asked.
    file: File,
    /// With O_DIRECT: the same image through the page cache, for requests
    /// whose buffers O_DIRECT cannot take.
    buffered: Option<File>,
    /// Bytes, rounded down to the logical block size.
    capacity: AtomicU64,
    pub logical_block_size: u32,
    pub readonly: bool,
    /// Memory alignment O_DIRECT needs.
    dio_align: u64,
    pub serial: Vec<u8>,
    /// Cleared when the filesystem refuses FALLOC_FL_ZERO_RANGE.
    zero_range: AtomicBool,
    /// With O_DIRECT: transfers of at least this many bytes go through a
    /// queue's huge-page bounce buffers ([`crate::io::bounce`]); 0: none do.
    pub bounce_from: u64,
    /// A regular file (not a block device): it could grow.
    pub regular: bool,
    /// The process's file size limit follows the capacity (see
    /// [`Disk::hold_writes_to_capacity`]).
    limit_writes: AtomicBool,
}

impl Disk {
    pub fn new(
        file: File,
        buffered: Option<File>,
        logical_block_size: u32,
        readonly: bool,
        serial: Vec<u8>,
    ) -> io::Result<Self> {
        let dio_align = if buffered.is_some() {
            dio_mem_align(&file).unwrap_or(u64::from(logical_block_size))
        } else {
            1
        };
        let regular = file.metadata()?.file_type().is_file();
        let d = Disk {
            file,
            buffered,
            capacity: AtomicU64::new(0),
            logical_block_size,
            readonly,
            dio_align,
            serial,
            zero_range: AtomicBool::new(true),
            bounce_from: 0,
            regular,
            limit_writes: AtomicBool::new(false),
        };
        d.refresh_capacity()?;
        Ok(d)
    }

    /// The image as opened.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the image is opened with O_DIRECT (every read is disk work).
    pub fn direct(&self) -> bool {
        self.buffered.is_some()
    }

    /// Re-read the image's size. Returns whether it changed. With the
    /// write limit on, the limit follows before anyone hears of the change.
    pub fn refresh_capacity(&self) -> io::Result<bool> {
        let bytes = image_size(&self.file)?;
        let cap = bytes - bytes % u64::from(self.logical_block_size);
        if self.limit_writes.load(Ordering::Relaxed) && cap != self.capacity() {
            limit_file_size(cap)?;
        }
        Ok(self.capacity.swap(cap, Ordering::Relaxed) != cap)
    }

    /// Where the image ends now.
    pub fn end_now(&self) -> io::Result<u64> {
        image_size(&self.file)
    }

    /// Have the kernel refuse any write of this process past the capacity
    /// the guest was told (RLIMIT_FSIZE, following every resize; EFBIG
    /// instead of SIGXFSZ), whatever happens to the file meanwhile. For a
    /// backend process only: the limit holds for every regular file it
    /// writes, which is the image alone (its output goes to pipes or the
    /// journal).
    pub fn hold_writes_to_capacity(&self) -> io::Result<()> {
        if !self.regular || self.readonly {
            return Ok(());
        }
        // SAFETY: setting a signal disposition; no handler runs.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        limit_file_size(self.capacity())?;
        self.limit_writes.store(true, Ordering::Relaxed);
        Ok(())
    }

    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    pub fn geometry(&self) -> Geometry {
        Geometry {
            capacity: self.capacity(),
            logical_block_size: self.logical_block_size,
            readonly: self.readonly,
        }
    }

    /// The descriptors the process must keep.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.file.as_raw_fd()];
        v.extend(self.buffered.as_ref().map(|f| f.as_raw_fd()));
        v
    }

    /// The descriptor for a transfer into or out of `iov`.
    fn fd_for(&self, iov: &IoVecs) -> RawFd {
        if let Some(b) = &self.buffered {
            let a = self.dio_align;
            let aligned = iov
                .0
                .iter()
                .all(|v| (v.iov_base as u64) % a == 0 && (v.iov_len as u64) % a == 0);
            if !aligned {
                return b.as_raw_fd();
            }
        }
        self.file.as_raw_fd()
    }
}

/// Size of a regular file or a block device.
/// Set this process's RLIMIT_FSIZE soft limit to `bytes` (at most the
/// hard limit).
fn limit_file_size(bytes: u64) -> io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    lim.rlim_cur = bytes.min(lim.rlim_max);
    // SAFETY: setrlimit reads `lim`.
    if unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn image_size(f: &File) -> io::Result<u64> {
    // SAFETY: lseek on our own descriptor; SEEK_END works for both kinds.
    let end = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64)
}

/// O_DIRECT's memory alignment, from statx (Linux 6.1+).
fn dio_mem_align(f: &File) -> Option<u64> {
    const STATX_DIOALIGN: u32 = 0x2000;
    // SAFETY: statx fills the zeroed struct; an empty path with
    // AT_EMPTY_PATH names the descriptor itself.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe {
        libc::statx(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            &mut st,
        )
    };
    (rc == 0 && st.stx_mask & STATX_DIOALIGN != 0 && st.stx_dio_mem_align > 0)
        .then_some(u64::from(st.stx_dio_mem_align))
}

/// What to do with a write-zeroes the filesystem could not do itself.
#[derive(Debug, Clone, Copy)]
enum Fallback {
    None,
    /// Write zeros over the range instead.
    WriteZeros {
        offset: u64,
        len: u64,
    },
}

/// A request between the avail ring and the used ring.
struct InFlight {
    head: u16,
    /// Keeps the guest memory the operation reads or writes mapped.
    mem: Arc<GuestMemoryMmap>,
    status: GuestAddress,
    /// Bytes written into guest buffers so far (for the used length).
    written: u32,
    is_read: bool,
    op: Op,
    /// Bytes still to transfer (reads and writes).
    remaining: u64,
    fallback: Fallback,
    kind: u32,
    generation: u64,
    /// The bounce slot the transfer goes through, and the guest buffers it
    /// stands for.
    bounce: Option<(bounce::Slot, IoVecs)>,
}

/// One queue's engine and in-flight table.
struct QueueState {
    engine: Box<dyn Engine>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    done: Vec<(u64, IoResult)>,
    generation: u64,
    /// This queue's part of the vhost-user inflight area, when the frontend
    /// set one up.
    inflight: Option<InflightQueue>,
    inflight_counter: u64,
    /// Huge pages for bounced transfers.
    pool: bounce::Pool,
    /// Where the image file ends, read once per pass over the ring that
    /// has a write (None: not read in this pass).
    file_end: Option<u64>,
}

/// One queue's part of the inflight area (the vhost-user specification's
/// split-ring layout): a 16-byte header (features, version, desc_num,
/// last_batch_head, used_idx), then per descriptor 16 bytes (inflight, 5
/// padding, next, counter). Every head taken from the avail ring is marked
/// in flight with a rising counter until its used entry is written, so a
/// backend that restarts can find and resubmit what was lost.
#[derive(Clone, Copy)]
struct InflightQueue {
    base: *mut u8,
    size: u16,
}

// SAFETY: the pointer leads into a shared mapping that outlives every use:
// it is cleared from each queue (under the queue's lock) before the mapping
// goes.
unsafe impl Send for InflightQueue {}

impl InflightQueue {
    fn desc(&self, head: u16) -> Option<*mut u8> {
        // SAFETY: head < size keeps the entry inside this queue's part.
        (head < self.size).then(|| unsafe { self.base.add(16 + 16 * usize::from(head)) })
    }

    fn avail(&self, head: u16, counter: u64) {
        if let Some(d) = self.desc(head) {
            // SAFETY: inside the mapping (see `desc`); the counter field is
            // 8-byte aligned (the mapping is page-aligned, entries 16 bytes).
            unsafe {
                std::ptr::write_volatile(d.add(8).cast::<u64>(), counter);
                std::ptr::write_volatile(d, 1u8);
            }
        }
    }

    /// Written before a used entry goes to the ring: if the backend dies
    /// before it clears the descriptor, its successor can tell.
    fn batch(&self, head: u16) {
        // SAFETY: last_batch_head sits at byte 12 of the header.
        unsafe { std::ptr::write_volatile(self.base.add(12).cast::<u16>(), head) };
    }

    fn last_batch_head(&self) -> u16 {
        // SAFETY: as in `batch`.
        unsafe { std::ptr::read_volatile(self.base.add(12).cast::<u16>()) }
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: used_idx sits at byte 14 of the header.
        unsafe { std::ptr::read_volatile(self.base.add(14).cast::<u16>()) }
    }

    fn set_used_idx(&self, idx: u16) {
        // SAFETY: as in `used_idx`.
        unsafe { std::ptr::write_volatile(self.base.add(14).cast::<u16>(), idx) };
    }

    fn clear(&self, head: u16) {
        if let Some(d) = self.desc(head) {
            // SAFETY: as in `avail`.
            unsafe { std::ptr::write_volatile(d, 0u8) };
        }
    }

    /// (counter, head) of every descriptor marked in flight, among the
    /// first `size`.
    fn marked(&self, size: u16) -> Vec<(u64, u16)> {
        (0..size.min(self.size))
            .filter_map(|head| {
                let d = self.desc(head)?;
                // SAFETY: as in `avail`.
                unsafe {
                    (std::ptr::read_volatile(d) == 1)
                        .then(|| (std::ptr::read_volatile(d.add(8).cast::<u64>()), head))
                }
            })
            .collect()
    }

    fn used(&self, head: u16, used_idx: u16) {
        if let Some(d) = self.desc(head) {
            // SAFETY: as in `avail`; used_idx sits at byte 14 of the header.
            unsafe {
                std::ptr::write_volatile(d, 0u8);
                std::ptr::write_volatile(self.base.add(14).cast::<u16>(), used_idx);
            }
        }
    }
}

/// The mapped inflight area of the current frontend.
struct InflightMap {
    ptr: *mut u8,
    len: usize,
    queue_bytes: usize,
    num_queues: usize,
    queue_size: u16,
}

// SAFETY: a plain shared mapping, only ever touched through InflightQueue.
unsafe impl Send for InflightMap {}

impl Drop for InflightMap {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value made; no queue points
        // into it any more (see InflightQueue).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl QueueState {
    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Wait for every operation in flight and forget its request.
    fn drain(&mut self) {
        while self.in_flight() > 0 {
            if let Err(e) = self.engine.wait() {
                warn!(error = %e, "waiting for I/O in flight; abandoning it");
                break;
            }
            let mut done = std::mem::take(&mut self.done);
            self.engine.reap(&mut done);
            for (token, _) in done.drain(..) {
                if let Some(f) = self.release(token as usize) {
                    self.give_back(f);
                }
            }
            self.done = done;
        }
        self.generation += 1;
    }

    fn insert(&mut self, f: InFlight) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(f);
                i
            }
            None => {
                self.slots.push(Some(f));
                self.slots.len() - 1
            }
        }
    }

    fn release(&mut self, i: usize) -> Option<InFlight> {
        let f = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        Some(f)
    }

    /// Return a finished request's bounce slot to the pool.
    fn give_back(&mut self, mut f: InFlight) {
        if let Some((slot, _)) = f.bounce.take() {
            self.pool.give(slot);
        }
    }
}

/// Bounce pages per queue: 16 MiB, room for 16 transfers of 1 MiB or 256
/// of 64 KiB in flight.
const BOUNCE_PAGES: usize = 8;
/// With guest memory in hugetlbfs pages, transfers in at most this many
/// pieces go straight.
const HUGE_GUEST_IOVECS: usize = 4;

/// Adaptive polling, per queue (after QEMU's AioContext polling): the
/// window grows while the next piece of work keeps arriving soon after the
/// thread went to sleep, and shrinks while spinning finds nothing. So a
/// busy low-latency disk is polled, and a host short of CPU (a TCG guest,
/// deep queues with long gaps) is not spun on.
#[derive(Default)]
struct Poll {
    /// Current window, in ns.
    window_ns: AtomicU64,
    /// When the thread last went to sleep, in ns since `EPOCH`; 0: awake.
    slept_at_ns: AtomicU64,
}

/// Smallest window once polling pays off.
const POLL_MIN_NS: u64 = 2_000;

fn now_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

impl Poll {
    fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Ordering::Relaxed))
    }

    /// Woken by an event: had the window been long enough to see it
    /// coming, grow it.
    fn woken(&self, max: Duration) {
        let slept = self.slept_at_ns.swap(0, Ordering::Relaxed);
        if slept == 0 || max.is_zero() {
            return;
        }
        let gap = now_ns().saturating_sub(slept);
        let max = max.as_nanos() as u64;
        if gap < max {
            let w = self.window_ns.load(Ordering::Relaxed);
            let grown = (w.max(POLL_MIN_NS / 2) * 2).max(gap + gap / 4).min(max);
            self.window_ns.store(grown, Ordering::Relaxed);
        }
    }

    /// Going to sleep; `wasted`: a whole window was spun for nothing.
    fn sleeping(&self, wasted: bool) {
        if wasted {
            let w = self.window_ns.load(Ordering::Relaxed) / 2;
            self.window_ns
                .store(if w < POLL_MIN_NS { 0 } else { w }, Ordering::Relaxed);
        }
        self.slept_at_ns.store(now_ns(), Ordering::Relaxed);
    }
}

/// Counts of what went wrong.
#[derive(Default)]
pub struct Faults {
    pub bad_chains: FaultCounter,
    pub io_errors: FaultCounter,
    pub rejected: FaultCounter,
}

/// The virtio-blk device.
pub struct BlkBackend {
    pub disk: Arc<Disk>,
    queues: Vec<Mutex<QueueState>>,
    mem: backend_common::MemorySlot,
    event_idx: AtomicBool,
    /// Every region of guest memory is in hugetlbfs pages: transfers in
    /// few pieces need no bouncing.
    guest_huge: AtomicBool,
    queue_size: usize,
    /// The longest a queue thread keeps looking for work after the last.
    poll: Duration,
    polls: Vec<Poll>,
    /// The frontend's backend channel, left by the message shim.
    channel: backend_common::shim::ChannelSlot,
    /// The inflight area the message shim keeps, and its mapping.
    inflight_slot: backend_common::shim::InflightSlot,
    inflight_map: Mutex<Option<InflightMap>>,
    /// Per queue: the connection thread asking the queue's worker to
    /// finish what it has in flight (before GET_VRING_BASE is answered).
    stops: Vec<StopRequest>,
    pub faults: Faults,
}

/// See [`BlkBackend::stop_ring`].
struct StopRequest {
    event: vmm_sys_util::eventfd::EventFd,
    pending: Mutex<bool>,
    done: std::sync::Condvar,
}

impl BlkBackend {
    /// A device with one queue per engine.
    pub fn new(
        disk: Arc<Disk>,
        engines: Vec<Box<dyn Engine>>,
        queue_size: usize,
        poll: Duration,
    ) -> Self {
        BlkBackend {
            disk,
            polls: engines.iter().map(|_| Poll::default()).collect(),
            stops: engines
                .iter()
                .map(|_| StopRequest {
                    event: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
                        .expect("an eventfd"),
                    pending: Mutex::new(false),
                    done: std::sync::Condvar::new(),
                })
                .collect(),
            channel: Default::default(),
            inflight_slot: Default::default(),
            inflight_map: Mutex::new(None),
            queues: engines
                .into_iter()
                .map(|engine| {
                    Mutex::new(QueueState {
                        engine,
                        slots: Vec::new(),
                        free: Vec::new(),
                        done: Vec::new(),
                        generation: 0,
                        inflight: None,
                        inflight_counter: 0,
                        pool: bounce::Pool::new(BOUNCE_PAGES),
                        file_end: None,
                    })
                })
                .collect(),
            mem: backend_common::MemorySlot::default(),
            event_idx: AtomicBool::new(false),
            guest_huge: AtomicBool::new(false),
            queue_size,
            poll,
            faults: Faults::default(),
        }
    }

    /// virtio_blk_config, up to write_zeroes_may_unmap.
    pub fn config_space(&self) -> Vec<u8> {
        let d = &self.disk;
        let lbs = d.logical_block_size;
        let mut c = vec![0u8; 60];
        c[0..8].copy_from_slice(&(d.capacity() / request::SECTOR).to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&lbs.to_le_bytes());
        // Topology: 4 KiB physical blocks, whatever the logical size, so
        // the guest keeps its writes to whole host pages.
        c[24] = (4096 / lbs).trailing_zeros() as u8;
        c[26..28].copy_from_slice(&((4096 / lbs) as u16).to_le_bytes());
        c[34..36].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        c[36..40].copy_from_slice(&request::MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&(request::MAX_RANGE_SEGMENTS as u32).to_le_bytes());
        c[44..48].copy_from_slice(&(4096u32 / request::SECTOR as u32).to_le_bytes());
        c[48..52].copy_from_slice(&request::MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&(request::MAX_RANGE_SEGMENTS as u32).to_le_bytes());
        c[56] = 1;
        c
    }

    /// Tell the frontend the config space changed (the image was resized),
    /// if it gave us a backend channel. Returns whether a notice went out.
    pub fn config_changed(&self) -> bool {
        let Ok(slot) = self.channel.lock() else {
            return false;
        };
        match slot.as_ref().map(backend_common::shim::send_config_change) {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                warn!(error = %e, "cannot send the config-change notice");
                false
            }
            None => false,
        }
    }

    /// Queue `q`'s part of the inflight area, mapping the area the shim
    /// keeps the first time a queue asks.
    fn inflight_for(&self, q: usize) -> Option<InflightQueue> {
        let mut map = self.inflight_map.lock().ok()?;
        if map.is_none() {
            let slot = self.inflight_slot.lock().ok()?;
            let area = slot.as_ref()?;
            let len = area.size as usize;
            // A file shorter than the size claimed would fault on access.
            // SAFETY: fstat on the descriptor the shim keeps, into a zeroed
            // struct.
            let file_len = unsafe {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::fstat(area.fd.as_raw_fd(), &mut st) != 0 {
                    return None;
                }
                st.st_size as usize
            };
            if len == 0 || file_len < len {
                warn!(
                    len,
                    file_len, "ignoring an inflight area smaller than declared"
                );
                return None;
            }
            // Nor may it shrink later, under the mapping (the areas this
            // backend makes are sealed so; QEMU's are too).
            // SAFETY: fcntl on the descriptor the shim keeps.
            let seals = unsafe { libc::fcntl(area.fd.as_raw_fd(), libc::F_GET_SEALS) };
            if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
                warn!("ignoring an inflight area that can shrink (not sealed against it)");
                return None;
            }
            // SAFETY: mapping the memfd the frontend shares with us, with
            // the size it declared; checked for failure.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    area.fd.as_raw_fd(),
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                warn!(error = %io::Error::last_os_error(), "cannot map the inflight area");
                return None;
            }
            let queue_bytes = backend_common::shim::inflight_queue_bytes(area.queue_size) as usize;
            let m = InflightMap {
                ptr: ptr.cast(),
                len,
                queue_bytes,
                num_queues: usize::from(area.num_queues).min(len / queue_bytes.max(1)),
                queue_size: area.queue_size,
            };
            for i in 0..m.num_queues {
                // SAFETY: each queue's header lies inside the mapping.
                unsafe {
                    let h = m.ptr.add(i * queue_bytes);
                    std::ptr::write_volatile(h.add(8).cast::<u16>(), 1);
                    std::ptr::write_volatile(h.add(10).cast::<u16>(), m.queue_size);
                }
            }
            *map = Some(m);
        }
        let m = map.as_ref()?;
        (q < m.num_queues).then(|| InflightQueue {
            // SAFETY: queue q's part lies inside the mapping.
            base: unsafe { m.ptr.add(q * m.queue_bytes) },
            size: m.queue_size,
        })
    }

    /// Forget the previous frontend's inflight area.
    fn reset_inflight(&self) {
        for q in &self.queues {
            if let Ok(mut s) = q.lock() {
                s.inflight = None;
            }
        }
        if let Ok(mut m) = self.inflight_map.lock() {
            *m = None;
        }
        if let Ok(mut s) = self.inflight_slot.lock() {
            *s = None;
        }
    }

    /// Register each queue's completion eventfd with its worker thread.
    pub fn register_engines(
        &self,
        handlers: &[Arc<VringEpollHandler<Arc<BlkBackend>>>],
    ) -> io::Result<()> {
        for (q, h) in handlers.iter().enumerate() {
            let Some(state) = self.queues.get(q) else {
                continue;
            };
            let mut s = state
                .lock()
                .map_err(|_| io::Error::other("queue lock poisoned"))?;
            // Leftovers of a frontend that left: finish them first.
            s.drain();
            h.register_listener(
                s.engine.notifier(),
                EventSet::IN,
                self.completion_event(q) as u64,
            )
            .map_err(io::Error::other)?;
            h.register_listener(
                self.stops[q].event.as_raw_fd(),
                EventSet::IN,
                self.stop_event(q) as u64,
            )
            .map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// After a frontend has gone: let I/O into its memory finish.
    pub fn drain_all(&self) {
        for q in &self.queues {
            if let Ok(mut s) = q.lock() {
                s.drain();
            }
        }
    }

    fn completion_event(&self, q: usize) -> usize {
        self.queues.len() + 1 + q
    }

    fn stop_event(&self, q: usize) -> usize {
        2 * self.queues.len() + 1 + q
    }

    /// Called by the message shim before GET_VRING_BASE for ring `q` goes
    /// to the library: has the queue's worker finish every request it has
    /// in flight and return it to the used ring, and waits for that (at
    /// most 30 s). Without it the frontend could be told a ring position
    /// while writes it covers are still running, and their used entries
    /// would land in a ring the frontend believes stopped.
    pub fn stop_ring(&self, q: usize) {
        let Some(stop) = self.stops.get(q) else {
            return;
        };
        let mut pending = stop.pending.lock().unwrap_or_else(|e| e.into_inner());
        *pending = true;
        if stop.event.write(1).is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while *pending {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!(queue = q, "I/O still in flight when the ring was stopped");
                *pending = false;
                return;
            }
            pending = match stop.done.wait_timeout(pending, left) {
                Ok((p, _)) => p,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// The worker's half of [`BlkBackend::stop_ring`].
    fn finish_in_flight(&self, q: usize, vring: &VringRwLock) {
        let _ = self.stops[q].event.read();
        if let Ok(mut state) = self.queues[q].lock() {
            let mut vstate = vring.get_mut();
            let mut used = self.complete(q, &mut state, &mut vstate);
            while state.in_flight() > 0 {
                if let Err(e) = state.engine.wait() {
                    warn!(queue = q, error = %e, "waiting for I/O in flight");
                    break;
                }
                used |= self.complete(q, &mut state, &mut vstate);
            }
            drop(state);
            if used {
                let _ = self.notify(&mut vstate);
            }
        }
        let stop = &self.stops[q];
        *stop.pending.lock().unwrap_or_else(|e| e.into_inner()) = false;
        stop.done.notify_all();
    }

    /// Whether a write of `len` bytes at `offset` stays inside the image
    /// file as it is now (a block device cannot grow: always). A file the
    /// host shrank under the guest is never grown back by a write planned
    /// against its old size: the write fails instead, and is logged.
    fn within_file(&self, state: &mut QueueState, offset: u64, len: u64) -> bool {
        if !self.disk.regular {
            return true;
        }
        let end = match state.file_end {
            Some(e) => e,
            None => match self.disk.end_now() {
                Ok(e) => *state.file_end.insert(e),
                // Unknown: the rlimit still holds writes to the capacity.
                Err(_) => return true,
            },
        };
        let inside = offset.checked_add(len).is_some_and(|e| e <= end);
        if !inside {
            if let Some(count) = self.faults.rejected.hit() {
                warn!(
                    offset,
                    len,
                    file_end = end,
                    count,
                    "a write past the image file's end (shrunk on the host?) refused"
                );
            }
        }
        inside
    }

    /// One step of queue `q`: complete what the engine has finished, take
    /// every available request and start its I/O. Returns whether anything
    /// happened.
    fn service(&self, q: usize, vring: &VringRwLock) -> io::Result<bool> {
        let Some(mem) = self.mem.memory() else {
            return Ok(false);
        };
        let mem = mem.into_inner();
        let mut state = self.queues[q]
            .lock()
            .map_err(|_| io::Error::other("queue lock poisoned"))?;
        let newly_mapped = state.inflight.is_none() && {
            state.inflight = self.inflight_for(q);
            state.inflight.is_some()
        };
        let ifl = state.inflight;
        let mut vstate = vring.get_mut();
        let geometry = self.disk.geometry();
        state.file_end = None;
        let direct = self.disk.direct();
        let mut used_any = self.complete(q, &mut state, &mut vstate);
        let mut took = 0usize;
        if let (true, Some(i)) = (newly_mapped, ifl) {
            took += self.resubmit_lost(
                q,
                &mut state,
                &mut vstate,
                &mem,
                &geometry,
                i,
                &mut used_any,
            );
        }
        while let Some(chain) = vstate.get_queue_mut().pop_descriptor_chain(mem.clone()) {
            let head = chain.head_index();
            took += 1;
            if let Some(i) = ifl {
                state.inflight_counter = state.inflight_counter.wrapping_add(1);
                i.avail(head, state.inflight_counter);
            }
            let descs = chain.map(|d| Desc {
                addr: d.addr(),
                len: d.len(),
                writable: d.is_write_only(),
            });
            used_any |= self.start_request(
                q,
                &mut state,
                &mut vstate,
                &mem,
                &geometry,
                ifl,
                head,
                descs,
            );
            // With O_DIRECT each request goes to the disk as soon as it is
            // parsed: a burst of 30 submitted together kept the first
            // waiting for the parsing of the other 29, and the disk idle
            // meanwhile. Through the page cache most reads are copies done
            // inside the submitting call, so one call for the burst is
            // cheaper there.
            if direct {
                self.submit(q, &mut state);
            }
        }
        if took > 0 {
            // Through the page cache: the whole burst. With O_DIRECT:
            // what resubmission queued, if anything (the engine skips an
            // empty submission).
            self.submit(q, &mut state);
            // Reads from the page cache are often done by now.
            used_any |= self.complete(q, &mut state, &mut vstate);
        }
        drop(state);
        if used_any {
            self.notify(&mut vstate)?;
        }
        Ok(used_any || took > 0)
    }

    /// Start what the engine holds. An error leaves it queued there: the
    /// next submission retries.
    fn submit(&self, q: usize, state: &mut QueueState) {
        if let Err(e) = state.engine.submit() {
            if let Some(count) = self.faults.io_errors.hit() {
                warn!(queue = q, error = %e, count, "submitting I/O");
            }
        }
    }

    /// Start again the requests a previous backend took from this queue and
    /// never finished, as the inflight area it shared with the frontend
    /// records them (the vhost-user specification's recovery for split
    /// rings): in the order it took them, before anything new. The avail
    /// position goes past them, so none is taken twice. Returns how many.
    #[allow(clippy::too_many_arguments)]
    fn resubmit_lost(
        &self,
        q: usize,
        state: &mut QueueState,
        vstate: &mut VringState,
        mem: &Arc<GuestMemoryMmap>,
        geometry: &Geometry,
        ifl: InflightQueue,
        used_any: &mut bool,
    ) -> usize {
        let queue = vstate.get_queue();
        let size = queue.size();
        let desc_table = GuestAddress(queue.desc_table());
        let used_idx_addr = GuestAddress(queue.used_ring()).unchecked_add(2);
        let Ok(used_idx) = mem.read_obj::<u16>(used_idx_addr).map(u16::from_le) else {
            return 0;
        };
        if ifl.used_idx() != used_idx {
            // The last used entry reached the ring, not the area: it is done.
            ifl.clear(ifl.last_batch_head());
            ifl.set_used_idx(used_idx);
        }
        let mut lost = ifl.marked(size);
        if lost.is_empty() {
            return 0;
        }
        lost.sort_unstable();
        let qm = vstate.get_queue_mut();
        qm.set_next_used(used_idx);
        qm.set_next_avail(used_idx.wrapping_add(lost.len() as u16));
        state.inflight_counter = state.inflight_counter.max(lost[lost.len() - 1].0);
        tracing::info!(
            queue = q,
            requests = lost.len(),
            "resubmitting requests the previous backend left in flight"
        );
        for &(_, head) in &lost {
            match chain_descs(mem, desc_table, size, head) {
                Some(descs) => {
                    state.inflight_counter = state.inflight_counter.wrapping_add(1);
                    ifl.avail(head, state.inflight_counter);
                    *used_any |= self.start_request(
                        q,
                        state,
                        vstate,
                        mem,
                        geometry,
                        Some(ifl),
                        head,
                        descs.into_iter(),
                    );
                }
                None => {
                    if let Some(count) = self.faults.bad_chains.hit() {
                        warn!(
                            queue = q,
                            head, count, "dropping an unusable request left in flight"
                        );
                    }
                    *used_any |= add_used(vstate, head, 0, Some(ifl));
                }
            }
        }
        lost.len()
    }

    /// Parse one request the guest made available and start it: answered
    /// at once (bad request, GET_ID, nothing to do) or pushed to the
    /// engine. Returns whether a used entry was written.
    #[allow(clippy::too_many_arguments)]
    fn start_request(
        &self,
        q: usize,
        state: &mut QueueState,
        vstate: &mut VringState,
        mem: &Arc<GuestMemoryMmap>,
        geometry: &Geometry,
        ifl: Option<InflightQueue>,
        head: u16,
        descs: impl Iterator<Item = Desc>,
    ) -> bool {
        let mut used_any = false;
        let req = match request::parse(&**mem, descs) {
            Ok(r) => r,
            Err(e) => {
                if let Some(count) = self.faults.bad_chains.hit() {
                    warn!(queue = q, head, error = %e, count, "dropping an unusable request");
                }
                used_any |= add_used(vstate, head, 0, ifl);
                return used_any;
            }
        };
        let mut finish = |st: u8, written: u32| {
            // The status address was checked by the parser.
            let _ = mem.write_obj(st, req.status);
            add_used(vstate, head, written + 1, ifl)
        };
        let plan = match request::plan(&**mem, &req, geometry) {
            Ok(p) => p,
            Err(st) => {
                if let Some(count) = self.faults.rejected.hit() {
                    debug!(
                        queue = q,
                        kind = req.kind,
                        sector = req.sector,
                        status = st,
                        count,
                        "request refused"
                    );
                }
                used_any |= finish(st, 0);
                return used_any;
            }
        };
        let mut bounced = None;
        let (op, fallback) = match plan {
            Plan::Nothing => {
                used_any |= finish(status::OK, 0);
                return used_any;
            }
            Plan::GetId { bufs } => {
                let mut id = [0u8; request::ID_BYTES];
                id[..self.disk.serial.len()].copy_from_slice(&self.disk.serial);
                let n = request::write_gathered(&**mem, &bufs, &id).unwrap_or(0);
                used_any |= finish(status::OK, n as u32);
                return used_any;
            }
            Plan::Read { offset, bufs } | Plan::Write { offset, bufs } => {
                let Some(iov) = iovecs(mem, &bufs) else {
                    used_any |= finish(status::IOERR, 0);
                    return used_any;
                };
                if req.kind != request::kind::IN && !self.within_file(state, offset, iov.total()) {
                    used_any |= finish(status::IOERR, 0);
                    return used_any;
                }
                let fd = self.disk.fd_for(&iov);
                let is_read = req.kind == request::kind::IN;
                let iov = match self.bounce(state, fd, is_read, iov) {
                    Ok((slot, guest)) => {
                        let v = slot.iovecs();
                        bounced = Some((slot, guest));
                        v
                    }
                    Err(iov) => iov,
                };
                let op = if is_read {
                    Op::Read { fd, iov, offset }
                } else {
                    Op::Write { fd, iov, offset }
                };
                (op, Fallback::None)
            }
            Plan::Flush => (
                Op::Sync {
                    fd: self.disk.file.as_raw_fd(),
                },
                Fallback::None,
            ),
            Plan::Discard { offset, len } => (
                Op::Fallocate {
                    fd: self.disk.file.as_raw_fd(),
                    mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                },
                Fallback::None,
            ),
            Plan::WriteZeroes { offset, len, unmap } => {
                let fallback = Fallback::WriteZeros { offset, len };
                if !self.within_file(state, offset, len) {
                    used_any |= finish(status::IOERR, 0);
                    return used_any;
                }
                if !unmap && !self.disk.zero_range.load(Ordering::Relaxed) {
                    (zero_write(&self.disk, offset, len), Fallback::None)
                } else {
                    let mode = if unmap {
                        libc::FALLOC_FL_PUNCH_HOLE
                    } else {
                        libc::FALLOC_FL_ZERO_RANGE
                    };
                    (
                        Op::Fallocate {
                            fd: self.disk.file.as_raw_fd(),
                            mode: mode | libc::FALLOC_FL_KEEP_SIZE,
                            offset,
                            len,
                        },
                        fallback,
                    )
                }
            }
        };
        let remaining = match &op {
            Op::Read { iov, .. } | Op::Write { iov, .. } => iov.total(),
            _ => 0,
        };
        let generation = state.generation;
        let slot = state.insert(InFlight {
            head,
            mem: Arc::clone(mem),
            status: req.status,
            written: 0,
            is_read: req.kind == request::kind::IN,
            op: op.clone(),
            remaining,
            fallback,
            kind: req.kind,
            generation,
            bounce: bounced,
        });
        if let Err(e) = state.engine.push(slot as u64, op) {
            if let Some(f) = state.release(slot) {
                state.give_back(f);
            }
            if let Some(count) = self.faults.io_errors.hit() {
                warn!(queue = q, error = %e, count, "cannot queue I/O");
            }
            used_any |= finish(status::IOERR, 0);
        }
        used_any
    }

    /// A bounce slot for a transfer between `iov` and the image on `fd`,
    /// when this disk bounces transfers of its size (with a write, the
    /// guest's data is copied into the slot now); else `iov` back.
    fn bounce(
        &self,
        state: &mut QueueState,
        fd: RawFd,
        is_read: bool,
        iov: IoVecs,
    ) -> Result<(bounce::Slot, IoVecs), IoVecs> {
        let from = self.disk.bounce_from;
        let total = iov.total();
        // Only O_DIRECT transfers (the page cache copies anyway). Where
        // guest memory is in huge pages, a transfer is about one segment
        // per iovec (guest pages adjacent in guest memory are adjacent
        // physically too): only one of many pieces is worth the copy.
        if from == 0
            || total < from
            || !self.disk.direct()
            || fd != self.disk.file.as_raw_fd()
            || (self.guest_huge.load(Ordering::Relaxed) && iov.0.len() <= HUGE_GUEST_IOVECS)
        {
            return Err(iov);
        }
        let Some(mut slot) = state.pool.take(total as usize) else {
            return Err(iov);
        };
        if !is_read {
            slot.copy_in(&iov);
        }
        Ok((slot, iov))
    }

    /// Finish the requests whose I/O has completed. Returns whether any
    /// used entry was written.
    fn complete(&self, q: usize, state: &mut QueueState, vstate: &mut VringState) -> bool {
        let mut used_any = false;
        let ifl = state.inflight;
        let mut done = std::mem::take(&mut state.done);
        state.engine.reap(&mut done);
        let mut resubmit = false;
        for (token, res) in done.drain(..) {
            let slot = token as usize;
            let Some(mut f) = state.release(slot) else {
                continue;
            };
            if f.generation != state.generation {
                state.give_back(f);
                continue;
            }
            let st = match self.outcome(q, &mut f, res) {
                Outcome::Done(st) => st,
                Outcome::Again(op) => {
                    let generation = f.generation;
                    let mut f = f;
                    f.op = op.clone();
                    f.generation = generation;
                    let new = state.insert(f);
                    match state.engine.push(new as u64, op) {
                        Ok(()) => {
                            resubmit = true;
                            continue;
                        }
                        Err(_) => {
                            let Some(f2) = state.release(new) else {
                                continue;
                            };
                            let _ = f2.mem.write_obj(status::IOERR, f2.status);
                            used_any |= add_used(vstate, f2.head, 1, ifl);
                            state.give_back(f2);
                            continue;
                        }
                    }
                }
            };
            if let Some((slot, guest)) = f.bounce.take() {
                // What was read is real data, a failed read's first part
                // too: the used length counts it.
                if f.is_read {
                    slot.copy_out(&guest, f.written as usize);
                }
                state.pool.give(slot);
            }
            let _ = f.mem.write_obj(st, f.status);
            // The status byte too (a read of 4 GiB or more saturates).
            used_any |= add_used(vstate, f.head, f.written.saturating_add(1), ifl);
        }
        state.done = done;
        if resubmit {
            if let Err(e) = state.engine.submit() {
                warn!(queue = q, error = %e, "resubmitting I/O");
            }
        }
        used_any
    }

    /// What a completion means for its request.
    fn outcome(&self, q: usize, f: &mut InFlight, res: IoResult) -> Outcome {
        if res < 0 {
            let errno = (-res) as i32;
            if errno == libc::EOPNOTSUPP || errno == libc::EINVAL {
                if let Fallback::WriteZeros { offset, len } = f.fallback {
                    if let Op::Fallocate { mode, .. } = f.op {
                        if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
                            self.disk.zero_range.store(false, Ordering::Relaxed);
                        }
                    }
                    f.fallback = Fallback::None;
                    return Outcome::Again(zero_write(&self.disk, offset, len));
                }
                if f.kind == request::kind::DISCARD {
                    return Outcome::Done(status::UNSUPP);
                }
            }
            if let Some(count) = self.faults.io_errors.hit() {
                warn!(queue = q, kind = f.kind, error = %io::Error::from_raw_os_error(errno), count, "I/O error");
            }
            return Outcome::Done(status::IOERR);
        }
        let n = res as u64;
        match &mut f.op {
            Op::Read { iov, offset, .. } | Op::Write { iov, offset, .. } => {
                if f.is_read {
                    f.written = f.written.saturating_add(n as u32);
                }
                if n >= f.remaining {
                    return Outcome::Done(status::OK);
                }
                if n == 0 {
                    // The image ended early: it shrank under us.
                    if let Some(count) = self.faults.io_errors.hit() {
                        warn!(
                            queue = q,
                            offset = *offset,
                            count,
                            "short transfer at the image's end"
                        );
                    }
                    return Outcome::Done(status::IOERR);
                }
                iov.advance(n as usize);
                *offset += n;
                f.remaining -= n;
                Outcome::Again(f.op.clone())
            }
            _ => Outcome::Done(status::OK),
        }
    }

    fn notify(&self, vstate: &mut VringState) -> io::Result<()> {
        if !self.event_idx.load(Ordering::Relaxed) || vstate.needs_notification().unwrap_or(true) {
            vstate.signal_used_queue()?;
        }
        Ok(())
    }
}

enum Outcome {
    Done(u8),
    Again(Op),
}

fn add_used(vstate: &mut VringState, head: u16, len: u32, ifl: Option<InflightQueue>) -> bool {
    if let Some(i) = ifl {
        i.batch(head);
    }
    match vstate.add_used(head, len) {
        Ok(()) => {
            if let Some(i) = ifl {
                i.used(head, vstate.get_queue().next_used());
            }
            true
        }
        Err(e) => {
            warn!(head, error = %e, "cannot return a used buffer");
            false
        }
    }
}

/// The descriptors of the chain at `head`, read from the descriptor table
/// (for requests found again through the inflight area, which the queue
/// library cannot walk from a head). Follows one level of indirection;
/// refuses loops, out-of-range indices and tables outside guest memory.
fn chain_descs(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Option<Vec<Desc>> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    const MAX_INDIRECT: u32 = u16::MAX as u32;
    let (mut table, mut size, mut idx) = (table, u32::from(size), u32::from(head));
    let mut indirect = false;
    let mut out = Vec::new();
    loop {
        if idx >= size || out.len() >= size as usize {
            return None;
        }
        let mut raw = [0u8; 16];
        mem.read_slice(&mut raw, table.checked_add(16 * u64::from(idx))?)
            .ok()?;
        let addr = u64::from_le_bytes(raw[0..8].try_into().ok()?);
        let len = u32::from_le_bytes(raw[8..12].try_into().ok()?);
        let flags = u16::from_le_bytes(raw[12..14].try_into().ok()?);
        let next = u16::from_le_bytes(raw[14..16].try_into().ok()?);
        if flags & INDIRECT != 0 {
            // The same bound as virtio-queue's on the request path: a
            // larger table is refused, not read.
            if indirect || !out.is_empty() || len % 16 != 0 || len == 0 || len / 16 > MAX_INDIRECT {
                return None;
            }
            indirect = true;
            table = GuestAddress(addr);
            size = len / 16;
            idx = 0;
            continue;
        }
        out.push(Desc {
            addr: GuestAddress(addr),
            len,
            writable: flags & WRITE != 0,
        });
        if flags & NEXT == 0 {
            return Some(out);
        }
        idx = u32::from(next);
    }
}

/// Host iovecs for guest buffers (already checked to be in guest memory).
/// Buffers that follow each other in host memory (a guest's pages often
/// do) become one iovec: the kernel then copies a run at a time.
fn iovecs(mem: &GuestMemoryMmap, bufs: &[Segment]) -> Option<IoVecs> {
    let mut v: Vec<libc::iovec> = Vec::with_capacity(bufs.len());
    for b in bufs {
        for slice in mem.get_slices(b.addr, b.len as usize) {
            let slice = slice.ok()?;
            let base: *mut libc::c_void = slice.ptr_guard_mut().as_ptr().cast();
            if let Some(last) = v.last_mut() {
                if (last.iov_base as usize).wrapping_add(last.iov_len) == base as usize {
                    last.iov_len += slice.len();
                    continue;
                }
            }
            v.push(libc::iovec {
                iov_base: base,
                iov_len: slice.len(),
            });
        }
    }
    (v.len() <= request::MAX_IOVECS).then_some(IoVecs(v))
}

/// Whether every region of `mem` is a hugetlbfs file: runs of guest pages
/// adjacent in guest memory are physically contiguous then.
fn all_in_hugetlbfs(mem: &GuestMemoryMmap) -> bool {
    const HUGETLBFS_MAGIC: libc::c_long = 0x9584_58f6;
    let mut any = false;
    for r in mem.iter() {
        let Some(fo) = r.file_offset() else {
            return false;
        };
        // SAFETY: fstatfs fills the zeroed struct for the region's own file.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstatfs(fo.file().as_raw_fd(), &mut st) } != 0
            || st.f_type as libc::c_long != HUGETLBFS_MAGIC
        {
            return false;
        }
        any = true;
    }
    any
}

/// A write of `len` zeros at `offset`, from the static zero buffer.
fn zero_write(disk: &Disk, offset: u64, len: u64) -> Op {
    let mut v = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64);
        v.push(libc::iovec {
            // pwritev only reads through this pointer.
            iov_base: ZEROS.as_ptr() as *mut libc::c_void,
            iov_len: n as usize,
        });
        left -= n;
    }
    Op::Write {
        fd: disk.file.as_raw_fd(),
        iov: IoVecs(v),
        offset,
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = feature::VERSION_1
            | feature::INDIRECT_DESC
            | feature::EVENT_IDX
            | feature::SIZE_MAX
            | feature::SEG_MAX
            | feature::BLK_SIZE
            | feature::TOPOLOGY
            | feature::FLUSH
            | feature::MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.disk.readonly {
            f |= feature::RO;
        } else {
            f |= feature::DISCARD | feature::WRITE_ZEROES;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ: the frontend gives us a channel for config-change
        // notices (a resized image reaches the guest at once).
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        backend_common::config_slice(&self.config_space(), offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        let huge = all_in_hugetlbfs(&vm_memory::GuestAddressSpace::memory(&mem));
        self.guest_huge.store(huge, Ordering::Relaxed);
        self.mem.set(mem)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected events {evset:?}")));
        }
        // One queue per thread: the thread's index is the queue's, and its
        // only vring is `vrings[0]` (a kick's event number counts within
        // the thread's own vrings).
        let q = thread;
        let (Some(vring), true) = (vrings.first(), q < self.queues.len()) else {
            return Err(io::Error::other(format!(
                "event for queue {q}, which does not exist"
            )));
        };
        if usize::from(device_event) == self.stop_event(q) {
            self.finish_in_flight(q, vring);
            return Ok(());
        }
        if usize::from(device_event) == self.completion_event(q) {
            if let Ok(s) = self.queues[q].lock() {
                s.engine.clear_notifier();
            }
        }
        // An error returned from here ends the worker thread for good: a
        // queue that is not set up (yet, or any more) waits, and its I/O
        // completions stay in the engine until it is.
        if !vring.get_ref().get_queue().ready() {
            return Ok(());
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let poll = &self.polls[q];
        poll.woken(self.poll);
        // Serve until the queue has been quiet for the poll window: a guest
        // that sends its next request, or an I/O that completes, within it
        // is handled without a kick, an interrupt or an epoll round trip.
        let window = poll.window();
        let mut last_work = Instant::now();
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            if self.service(q, vring)? {
                last_work = Instant::now();
                continue;
            }
            if !window.is_zero() && last_work.elapsed() < window {
                backend_common::poll_pause();
                continue;
            }
            // Going to sleep: with notifications back on, anything that
            // arrived in between is seen by this last look.
            if !event_idx || !vring.enable_notification().unwrap_or(false) {
                break;
            }
        }
        poll.sleeping(!window.is_zero());
        Ok(())
    }
}

/// Connection hooks: completions into each new worker's epoll set, and
/// in-flight I/O drained when a frontend goes.
pub struct Hooks(pub Arc<BlkBackend>);

impl backend_common::ConnectionHooks<Arc<BlkBackend>> for Hooks {
    fn start(&self, handlers: &[Arc<VringEpollHandler<Arc<BlkBackend>>>]) -> io::Result<()> {
        self.0.reset_inflight();
        self.0.register_engines(handlers)
    }

    fn end(&self) {
        self.0.drain_all();
    }

    /// The shim catches the backend channel for config-change notices.
    fn shim(&self) -> bool {
        true
    }

    fn backend_channel(&self) -> Option<backend_common::shim::ChannelSlot> {
        Some(Arc::clone(&self.0.channel))
    }

    fn inflight(&self) -> Option<backend_common::shim::InflightSlot> {
        Some(Arc::clone(&self.0.inflight_slot))
    }

    fn ring_stop(&self) -> Option<backend_common::shim::RingStopHook> {
        let b = Arc::clone(&self.0);
        Some(Arc::new(move |q| b.stop_ring(q as usize)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn buffers_adjacent_in_host_memory_become_one_iovec() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let seg = |addr: u64, len: u32| Segment {
            addr: GuestAddress(addr),
            len,
        };
        // Three pages in a row, then one elsewhere.
        let bufs = [
            seg(0x1000, 0x1000),
            seg(0x2000, 0x1000),
            seg(0x3000, 0x800),
            seg(0x8000, 0x1000),
        ];
        let v = iovecs(&mem, &bufs).unwrap().0;
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].iov_len, 0x2800);
        assert_eq!(v[1].iov_len, 0x1000);
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        assert_eq!(v[0].iov_base as usize, base + 0x1000);
        assert_eq!(v[1].iov_base as usize, base + 0x8000);
        // Out of order: nothing merges backwards.
        let v = iovecs(&mem, &[seg(0x2000, 0x1000), seg(0x1000, 0x1000)])
            .unwrap()
            .0;
        assert_eq!(v.len(), 2);
    }
}
