//! The vhost-user side: each queue pair's receive queue filled from its
//! link, its transmit queue drained into it, and the control queue.
//!
//! One worker thread per queue pair, each with its own link (a tap queue)
//! polled edge-triggered; nothing is locked across pairs. Frames move
//! between guest memory and the link by readv/writev on iovecs that point
//! into guest memory. Receive backpressure: when the guest has posted no
//! buffers the link is not read, the queue's notifications are turned on,
//! and the guest's next kick resumes reading; nothing spins.
//!
//! Queue 2k is receive queue k, 2k+1 transmit queue k, and queue 2N the
//! control queue, served on pair 0's thread. A frontend that keeps the
//! control queue to itself (QEMU) turns pairs on and off with
//! SET_VRING_ENABLE instead; either way a pair that is off has its tap
//! queue detached, so the kernel steers no flows to it.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use backend_common::FaultCounter;
use tracing::{error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::link::{offload, Link, VNET_HDR_LEN};

/// Feature bits (virtio 1.2, 5.1.3).
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    pub const CTRL_VQ: u64 = 1 << 17;
    pub const MQ: u64 = 1 << 22;
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Control queue classes and commands (virtio 1.2, 5.1.6.5).
pub mod ctrl {
    pub const OK: u8 = 0;
    pub const ERR: u8 = 1;
    pub const CLASS_MQ: u8 = 4;
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
}

/// Within a pair's thread: its receive and transmit queue, and on pair 0's
/// thread the control queue.
const RX: usize = 0;
const TX: usize = 1;
const CTRL: usize = 2;
/// The largest frame with its header: a 64 KiB GSO packet plus Ethernet
/// and VLAN headers.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_535 + 14 + 4;
/// readv/writev take at most this many iovecs.
const MAX_IOVECS: usize = 1024;
/// A control command's readable part: class, command and data. The only
/// command served takes 2 bytes of data.
const MAX_CTRL: usize = 64;
/// config status: VIRTIO_NET_S_LINK_UP.
const LINK_UP: u16 = 1;

/// What was moved and what was dropped, for the whole device.
#[derive(Default)]
pub struct Counters {
    pub tx_dropped: FaultCounter,
    pub rx_errors: FaultCounter,
    pub bad_chains: FaultCounter,
    pub bad_commands: FaultCounter,
}

/// What one queue pair moved.
#[derive(Default)]
pub struct PairStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
}

/// One queue pair: its link (a tap queue), what it moved, and whether the
/// frontend has its receive ring enabled.
pub struct Pair {
    link: Arc<dyn Link>,
    pub stats: PairStats,
    ring_enabled: AtomicBool,
    link_ok: AtomicBool,
    /// Whether the link takes frames now (what `steer` last set).
    attached: AtomicBool,
    /// The transmit batch's vectors, kept between calls so sending
    /// allocates nothing; only this pair's worker takes the lock.
    tx_batch: std::sync::Mutex<TxBatch>,
}

/// The virtio-net device.
pub struct NetBackend {
    pairs: Vec<Pair>,
    mac: [u8; 6],
    mtu: u16,
    queue_size: usize,
    mem: backend_common::MemorySlot,
    event_idx: AtomicBool,
    acked: AtomicU64,
    /// Pairs the driver asked for on the control queue.
    active_pairs: AtomicUsize,
    /// Whether this frontend passed us the control queue. QEMU keeps it
    /// (and acknowledges MQ all the same), turning pairs on and off with
    /// SET_VRING_ENABLE instead.
    ctrl_here: AtomicBool,
    /// Held while tap queues are attached and detached.
    steering: std::sync::Mutex<()>,
    /// How long a worker watches its transmit ring after the last frame.
    tx_poll: std::time::Duration,
    pub counters: Counters,
}

type Mem = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// Transmitted frames handed to the link at once, and between used-ring
/// notifications during a long run of them.
const TX_BATCH: usize = 32;

/// Frames popped from the transmit ring and not yet sent: their buffers
/// (one iovec list), where each frame's iovecs are, and their heads.
#[derive(Default)]
struct TxBatch {
    iov: Vec<libc::iovec>,
    frames: Vec<std::ops::Range<usize>>,
    heads: Vec<u16>,
    results: Vec<io::Result<usize>>,
    /// One chain's buffers, checked before they join `iov`.
    frame: Vec<libc::iovec>,
}

// SAFETY: the iovecs are plain addresses into guest memory, used only by
// the thread holding the batch's lock and cleared before it lets go
// (process_tx), so no pointer crosses threads.
unsafe impl Send for TxBatch {}

impl TxBatch {
    fn push(&mut self, head: u16, frame: &[libc::iovec]) {
        let start = self.iov.len();
        self.iov.extend_from_slice(frame);
        self.frames.push(start..self.iov.len());
        self.heads.push(head);
    }

    fn clear(&mut self) {
        self.iov.clear();
        self.frames.clear();
        self.heads.clear();
        self.results.clear();
        self.frame.clear();
    }
}

impl NetBackend {
    /// A device with one queue pair per link.
    pub fn new(links: Vec<Arc<dyn Link>>, mac: [u8; 6], mtu: u16, queue_size: usize) -> Self {
        assert!(
            !links.is_empty() && links.len() <= 31,
            "1 to 31 queue pairs"
        );
        NetBackend {
            pairs: links
                .into_iter()
                .map(|link| Pair {
                    link,
                    stats: PairStats::default(),
                    ring_enabled: AtomicBool::new(true),
                    link_ok: AtomicBool::new(true),
                    attached: AtomicBool::new(true),
                    tx_batch: Default::default(),
                })
                .collect(),
            mac,
            mtu,
            queue_size,
            mem: backend_common::MemorySlot::default(),
            event_idx: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            active_pairs: AtomicUsize::new(1),
            ctrl_here: AtomicBool::new(false),
            steering: std::sync::Mutex::new(()),
            tx_poll: std::time::Duration::ZERO,
            counters: Counters::default(),
        }
    }

    /// Watch the transmit ring for `poll` after each batch before sleeping
    /// until the guest's next kick (default: not at all).
    pub fn with_tx_poll(mut self, poll: std::time::Duration) -> Self {
        self.tx_poll = poll;
        self
    }

    /// The queue pairs.
    pub fn pairs(&self) -> &[Pair] {
        &self.pairs
    }

    /// The link's event on each worker: past the queues and the exit event.
    fn link_event(&self) -> u16 {
        (2 * self.pairs.len() + 2) as u16
    }

    /// virtio_net_config: mac, status, max_virtqueue_pairs, mtu.
    pub fn config_space(&self) -> Vec<u8> {
        let up = self.pairs.iter().all(|p| p.link_ok.load(Ordering::Relaxed));
        let status = if up { LINK_UP } else { 0 };
        let mut c = vec![0u8; 12];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&(self.pairs.len() as u16).to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// Put each pair's link into its worker's epoll set (edge-triggered),
    /// with every pair on until the frontend says otherwise.
    pub fn register_links(
        &self,
        handlers: &[Arc<VringEpollHandler<Arc<NetBackend>>>],
    ) -> io::Result<()> {
        self.active_pairs.store(self.pairs.len(), Ordering::Relaxed);
        self.ctrl_here.store(false, Ordering::Relaxed);
        for (pair, h) in self.pairs.iter().zip(handlers) {
            pair.ring_enabled.store(true, Ordering::Relaxed);
            h.register_listener(
                pair.link.fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                u64::from(self.link_event()),
            )
            .map_err(io::Error::other)?;
        }
        self.steer();
        Ok(())
    }

    /// The frontend turned ring `index` on or off (SET_VRING_ENABLE).
    pub fn ring_enabled(&self, index: u32, enabled: bool) {
        let index = index as usize;
        if index == 2 * self.pairs.len() {
            self.ctrl_here.store(enabled, Ordering::Relaxed);
            self.steer();
        } else if index % 2 == RX {
            if let Some(p) = self.pairs.get(index / 2) {
                p.ring_enabled.store(enabled, Ordering::Relaxed);
                self.steer();
            }
        }
    }

    /// Whether pair `p` takes frames: pair 0 always; another when its
    /// receive ring is on and, if the control queue is ours, the driver
    /// asked for that many pairs.
    pub fn pair_active(&self, p: usize) -> bool {
        let Some(pair) = self.pairs.get(p) else {
            return false;
        };
        p == 0
            || (pair.ring_enabled.load(Ordering::Relaxed)
                && (!self.ctrl_here.load(Ordering::Relaxed)
                    || p < self.active_pairs.load(Ordering::Relaxed)))
    }

    /// Attach the tap queues of active pairs and detach the others.
    fn steer(&self) {
        // One caller at a time, so the last state asked for is the one set.
        let _one = self.steering.lock().unwrap_or_else(|e| e.into_inner());
        for (p, pair) in self.pairs.iter().enumerate().skip(1) {
            let on = self.pair_active(p);
            match pair.link.set_active(on) {
                Ok(()) => {
                    if pair.attached.swap(on, Ordering::Relaxed) != on {
                        info!(pair = p, on, "queue pair switched");
                    }
                }
                Err(e) => warn!(pair = p, error = %e, "cannot attach or detach the tap queue"),
            }
        }
    }

    /// Log what each pair moved.
    pub fn log_stats(&self) {
        for (p, pair) in self.pairs.iter().enumerate() {
            let s = &pair.stats;
            info!(
                pair = p,
                rx_frames = s.rx_frames.load(Ordering::Relaxed),
                rx_bytes = s.rx_bytes.load(Ordering::Relaxed),
                tx_frames = s.tx_frames.load(Ordering::Relaxed),
                tx_bytes = s.tx_bytes.load(Ordering::Relaxed),
                "queue pair counters"
            );
        }
    }

    fn memory(&self) -> Option<Mem> {
        self.mem.memory()
    }

    fn has(&self, f: u64) -> bool {
        self.acked.load(Ordering::Relaxed) & f != 0
    }

    fn notify(&self, state: &mut VringState) -> io::Result<()> {
        if !self.event_idx.load(Ordering::Relaxed) || state.needs_notification().unwrap_or(true) {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    fn bad_chain(&self, state: &mut VringState, head: u16, why: &str) {
        if let Some(count) = self.counters.bad_chains.hit() {
            warn!(head, count, "dropping a chain: {why}");
        }
        let _ = state.add_used(head, 0);
    }

    /// The link of pair `p` is gone: say so once, and report the link down
    /// in the config space. The vhost-user side keeps serving.
    fn link_gone(&self, p: usize, why: &dyn std::fmt::Display) {
        let pair = &self.pairs[p];
        if pair.link_ok.swap(false, Ordering::Relaxed) {
            error!(
                pair = p,
                link = pair.link.name(),
                "the link is gone ({why}); frames are dropped until net-backend is started \
                 again on a working link (orchestrator restart DEVICE)"
            );
        }
    }

    /// Send every frame the guest queued on pair `p`, in batches of up to
    /// [`TX_BATCH`] frames handed to the link at once.
    fn process_tx(&self, p: usize, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        let mut batch = self.pairs[p]
            .tx_batch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let batch = &mut *batch;
        batch.clear();
        let result = self.fill_and_send(p, &mem, &mut state, batch);
        batch.clear();
        result
    }

    /// [`Self::process_tx`]'s loop, with the pair's batch.
    fn fill_and_send(
        &self,
        p: usize,
        mem: &Mem,
        state: &mut VringState,
        batch: &mut TxBatch,
    ) -> io::Result<()> {
        // Chains given back (dropped as bad) since the last notification.
        let mut unsignalled = false;
        loop {
            let chain = state.get_queue_mut().pop_descriptor_chain(mem.clone());
            if let Some(chain) = chain {
                let head = chain.head_index();
                let descs = chain.map(|d| (d.addr(), d.len(), d.is_write_only()));
                let mut frame = std::mem::take(&mut batch.frame);
                match tx_frame_into(mem, descs, &mut frame) {
                    Ok(()) => batch.push(head, &frame),
                    Err(why) => {
                        self.bad_chain(state, head, why);
                        unsignalled = true;
                    }
                }
                batch.frame = frame;
                if batch.heads.len() < TX_BATCH {
                    continue;
                }
            }
            if batch.heads.is_empty() {
                if unsignalled {
                    self.notify(state)?;
                }
                break;
            }
            self.send_batch(p, batch);
            for &head in &batch.heads {
                let _ = state.add_used(head, 0);
            }
            // Hand buffers back after each batch, not only when the ring
            // is empty: the guest refills the ring while this thread goes
            // on, instead of finding it empty when the whole run is over.
            self.notify(state)?;
            unsignalled = false;
            batch.clear();
        }
        Ok(())
    }

    /// Send a batch on pair `p`'s link and count what went.
    fn send_batch(&self, p: usize, batch: &mut TxBatch) {
        let pair = &self.pairs[p];
        pair.link
            .send_many(&batch.iov, &batch.frames, &mut batch.results);
        let (mut frames, mut bytes) = (0u64, 0u64);
        for r in &batch.results {
            match r {
                Ok(n) => {
                    frames += 1;
                    bytes += *n as u64;
                }
                Err(e) => {
                    // A full or gone link drops the frame, as a wire would;
                    // the guest's TCP sends it again.
                    if e.kind() == io::ErrorKind::NotConnected
                        && pair.link_ok.load(Ordering::Relaxed)
                    {
                        self.link_gone(p, e);
                    }
                    if let Some(count) = self.counters.tx_dropped.hit() {
                        warn!(pair = p, link = pair.link.name(), error = %e, count, "frame not sent");
                    }
                }
            }
        }
        pair.stats.tx_frames.fetch_add(frames, Ordering::Relaxed);
        pair.stats.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Fill pair `p`'s receive buffers from its link until one runs out.
    /// Returns whether the guest ran out of buffers.
    fn process_rx(&self, p: usize, vring: &VringRwLock) -> io::Result<bool> {
        let Some(mem) = self.memory() else {
            return Ok(false);
        };
        let pair = &self.pairs[p];
        let mergeable = self.has(feature::MRG_RXBUF);
        let mut state = vring.get_mut();
        if !state.is_enabled() {
            return Ok(false);
        }
        let mut used_any = false;
        let mut starved = false;
        let (mut frames, mut bytes) = (0u64, 0u64);
        // Reused for every frame: the chains taken (head, capacity, first
        // buffer) and all their buffers.
        let mut heads: Vec<(u16, usize, libc::iovec)> = Vec::with_capacity(4);
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(64);
        loop {
            // Buffers for one frame: one chain, or with mergeable buffers as
            // many as it takes to hold the largest frame.
            heads.clear();
            iov.clear();
            let mut room = 0usize;
            while room < MAX_FRAME {
                let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
                    break;
                };
                let head = chain.head_index();
                let mark = iov.len();
                let descs = chain.map(|d| (d.addr(), d.len(), d.is_write_only()));
                if let Err(why) = buffers_into(&mem, descs, true, &mut iov) {
                    self.bad_chain(&mut state, head, why);
                    used_any = true;
                    continue;
                }
                let cap: usize = iov[mark..].iter().map(|v| v.iov_len).sum();
                if cap < VNET_HDR_LEN && heads.is_empty() {
                    iov.truncate(mark);
                    self.bad_chain(&mut state, head, "receive buffer shorter than a header");
                    used_any = true;
                    continue;
                }
                room += cap;
                heads.push((head, cap, iov[mark]));
                if !mergeable {
                    break;
                }
            }
            if heads.is_empty() {
                starved = true;
                break;
            }
            let n_iov = iov.len().min(MAX_IOVECS);
            match pair.link.recv(&iov[..n_iov]) {
                Ok(n) => {
                    // The chains the frame filled; the rest go back.
                    let mut left = n;
                    let mut taken = 0;
                    for (_, cap, _) in &heads {
                        if left == 0 {
                            break;
                        }
                        left -= left.min(*cap);
                        taken += 1;
                    }
                    let taken = taken.max(1);
                    for _ in taken..heads.len() {
                        state.get_queue_mut().go_to_previous_position();
                    }
                    if mergeable {
                        // num_buffers, the header's last field, before the
                        // used entries make the frame visible.
                        write_at(heads[0].2, 10, &(taken as u16).to_le_bytes());
                    }
                    let mut left = n;
                    for (head, cap, _) in &heads[..taken] {
                        let len = left.min(*cap);
                        left -= len;
                        let _ = state.add_used(*head, len as u32);
                    }
                    used_any = true;
                    frames += 1;
                    bytes += n as u64;
                }
                Err(e) => {
                    for _ in 0..heads.len() {
                        state.get_queue_mut().go_to_previous_position();
                    }
                    match e.kind() {
                        io::ErrorKind::WouldBlock => {}
                        io::ErrorKind::NotConnected => self.link_gone(p, &e),
                        kind => {
                            if let Some(count) = self.counters.rx_errors.hit() {
                                warn!(link = pair.link.name(), error = %e, count, "receiving from the link");
                            }
                            if kind == io::ErrorKind::InvalidData {
                                // A frame too large for the buffers was
                                // consumed; try the next one.
                                continue;
                            }
                        }
                    }
                    break;
                }
            }
        }
        pair.stats.rx_frames.fetch_add(frames, Ordering::Relaxed);
        pair.stats.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
        if used_any {
            self.notify(&mut state)?;
        }
        Ok(starved)
    }

    /// Answer every command on the control queue.
    fn process_ctrl(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        let mut used = false;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
            let head = chain.head_index();
            used = true;
            let descs: Vec<_> = chain
                .map(|d| (d.addr(), d.len(), d.is_write_only()))
                .collect();
            match self.command(&mem, &descs) {
                Ok(()) => {
                    let _ = state.add_used(head, 1);
                }
                Err(why) => self.bad_chain(&mut state, head, why),
            }
        }
        if used {
            self.notify(&mut state)?;
        }
        Ok(())
    }

    /// One control command: class, command and data in the readable part,
    /// the ack written to the first byte of the writable part.
    fn command(
        &self,
        mem: &GuestMemoryMmap,
        descs: &[(GuestAddress, u32, bool)],
    ) -> Result<(), &'static str> {
        let mut cmd = Vec::new();
        let mut ack_at = None;
        for &(addr, len, writable) in descs {
            if writable {
                if len > 0 && ack_at.is_none() {
                    ack_at = Some(addr);
                }
            } else if ack_at.is_some() {
                return Err("a readable buffer after the ack");
            } else {
                let len = len as usize;
                if cmd.len() + len > MAX_CTRL {
                    return Err("a control command longer than any the device takes");
                }
                let at = cmd.len();
                cmd.resize(at + len, 0);
                mem.read_slice(&mut cmd[at..], addr)
                    .map_err(|_| "a buffer outside guest memory")?;
            }
        }
        let ack_at = ack_at.ok_or("a control command with no room for the ack")?;
        let ack = self.control(&cmd);
        mem.write_slice(&[ack], ack_at)
            .map_err(|_| "an ack buffer outside guest memory")
    }

    /// The answer to a control command.
    pub fn control(&self, cmd: &[u8]) -> u8 {
        let (class, command, data) = match cmd {
            [c, m, data @ ..] => (*c, *m, data),
            _ => (0xff, 0xff, &[][..]),
        };
        match (class, command, data) {
            (ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET, [lo, hi])
                if self.has(feature::MQ)
                    && (1..=self.pairs.len())
                        .contains(&usize::from(u16::from_le_bytes([*lo, *hi]))) =>
            {
                let n = usize::from(u16::from_le_bytes([*lo, *hi]));
                self.active_pairs.store(n, Ordering::Relaxed);
                self.steer();
                info!(pairs = n, "the driver set the queue pairs in use");
                ctrl::OK
            }
            _ => {
                if let Some(count) = self.counters.bad_commands.hit() {
                    warn!(
                        class,
                        command,
                        len = data.len(),
                        count,
                        "refusing a control command"
                    );
                }
                ctrl::ERR
            }
        }
    }
}

/// Write `bytes` at `offset` into the buffer `v` (a receive buffer at
/// least a header long: checked when the chain was taken).
fn write_at(v: libc::iovec, offset: usize, bytes: &[u8]) {
    if v.iov_len >= offset + bytes.len() {
        // SAFETY: inside a writable guest buffer the chain lent us, which
        // stays mapped while we hold the memory guard.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                v.iov_base.cast::<u8>().add(offset),
                bytes.len(),
            )
        };
    }
}

/// The buffers of a chain as iovecs: the writable ones for receive, the
/// readable ones for transmit; a chain with the other kind is refused.
/// [`buffers_into`] over any descriptor list, into a new vector.
pub fn buffers_of(
    mem: &GuestMemoryMmap,
    descs: impl IntoIterator<Item = (vm_memory::GuestAddress, u32, bool)>,
    writable: bool,
) -> Result<Vec<libc::iovec>, &'static str> {
    let mut v = Vec::new();
    buffers_into(mem, descs, writable, &mut v)?;
    Ok(v)
}

/// Append the buffers of a chain, (address, length, device-writable) each,
/// to `v` as iovecs: the writable ones for receive, the readable ones for
/// transmit; a chain with the other kind, outside guest memory, empty or
/// with too many buffers is refused (and `v` left as it was).
pub fn buffers_into(
    mem: &GuestMemoryMmap,
    descs: impl IntoIterator<Item = (vm_memory::GuestAddress, u32, bool)>,
    writable: bool,
    v: &mut Vec<libc::iovec>,
) -> Result<(), &'static str> {
    let mark = v.len();
    let r = (|| {
        for (addr, len, write_only) in descs {
            if write_only != writable {
                return Err(if writable {
                    "a readable buffer on the receive queue"
                } else {
                    "a writable buffer on the transmit queue"
                });
            }
            for slice in mem.get_slices(addr, len as usize) {
                let slice = slice.map_err(|_| "a buffer outside guest memory")?;
                v.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
            if v.len() - mark > MAX_IOVECS {
                return Err("too many buffers");
            }
        }
        if v.len() == mark {
            return Err("no buffers");
        }
        Ok(())
    })();
    if r.is_err() {
        v.truncate(mark);
    }
    r
}

/// The transmit path's checks on a chain: its buffers, and a length that
/// holds a header and an Ethernet header and is no larger than a frame.
pub fn tx_frame(
    mem: &GuestMemoryMmap,
    descs: impl IntoIterator<Item = (vm_memory::GuestAddress, u32, bool)>,
) -> Result<Vec<libc::iovec>, &'static str> {
    let mut v = Vec::new();
    tx_frame_into(mem, descs, &mut v)?;
    Ok(v)
}

/// [`tx_frame`] into a reused vector (cleared first).
pub fn tx_frame_into(
    mem: &GuestMemoryMmap,
    descs: impl IntoIterator<Item = (vm_memory::GuestAddress, u32, bool)>,
    v: &mut Vec<libc::iovec>,
) -> Result<(), &'static str> {
    v.clear();
    buffers_into(mem, descs, false, v)?;
    let len: usize = v.iter().map(|i| i.iov_len).sum();
    if !(VNET_HDR_LEN + 14..=MAX_FRAME).contains(&len) {
        v.clear();
        return Err("frame too short or too long");
    }
    Ok(())
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2 * self.pairs.len() + 1
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        let mq = if self.pairs.len() > 1 { feature::MQ } else { 0 };
        let offloads = if self.pairs.iter().all(|p| p.link.offloads()) {
            feature::CSUM
                | feature::GUEST_CSUM
                | feature::GUEST_TSO4
                | feature::GUEST_TSO6
                | feature::GUEST_ECN
                | feature::HOST_TSO4
                | feature::HOST_TSO6
                | feature::HOST_ECN
        } else {
            0
        };
        feature::VERSION_1
            | feature::MAC
            | feature::MTU
            | feature::STATUS
            | feature::MRG_RXBUF
            | offloads
            | feature::CTRL_VQ
            | mq
            | feature::INDIRECT_DESC
            | feature::EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        // A driver on the control queue starts on one pair (5.1.6.5.5);
        // without one, the frontend's ring enables decide.
        let pairs = if features & feature::MQ != 0 {
            1
        } else {
            self.pairs.len()
        };
        self.active_pairs.store(pairs, Ordering::Relaxed);
        self.steer();
        let mut flags = 0;
        if features & feature::GUEST_CSUM != 0 {
            flags |= offload::CSUM;
            if features & feature::GUEST_TSO4 != 0 {
                flags |= offload::TSO4;
            }
            if features & feature::GUEST_TSO6 != 0 {
                flags |= offload::TSO6;
            }
            if features & feature::GUEST_ECN != 0 {
                flags |= offload::TSO_ECN;
            }
        }
        for pair in &self.pairs {
            if let Err(e) = pair.link.set_offloads(flags) {
                warn!(error = %e, "cannot set the link's offloads");
                break;
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        backend_common::config_slice(&self.config_space(), offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem.set(mem)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread per pair with its link; the control queue with pair 0.
        let ctrl = 1u64 << (2 * self.pairs.len());
        (0..self.pairs.len())
            .map(|p| (0b11u64 << (2 * p)) | if p == 0 { ctrl } else { 0 })
            .collect()
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
        // An error returned from here ends the worker thread for good, so
        // every failure is logged and the worker carries on.
        if let Err(e) = self.event(device_event, evset, vrings, thread) {
            if let Some(count) = self.counters.rx_errors.hit() {
                warn!(pair = thread, error = %e, count, "serving a queue");
            }
        }
        Ok(())
    }
}

impl NetBackend {
    fn event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        p: usize,
    ) -> io::Result<()> {
        let (Some(rx), Some(tx)) = (vrings.get(RX), vrings.get(TX)) else {
            return Ok(());
        };
        if p >= self.pairs.len() {
            return Ok(());
        }
        let ready = |v: &VringRwLock| v.get_ref().get_queue().ready();
        let event = if device_event == self.link_event() {
            if evset.intersects(EventSet::ERROR | EventSet::HANG_UP)
                && !evset.contains(EventSet::IN)
            {
                self.link_gone(p, &format_args!("poll reports {evset:?}"));
                return Ok(());
            }
            RX
        } else {
            usize::from(device_event)
        };
        match event {
            TX if ready(tx) => loop {
                let _ = tx.disable_notification();
                self.process_tx(p, tx)?;
                // With kicks still off, watch the ring a little: a guest
                // sending its next frame soon sends it without a kick.
                if self.mem.poll_ring(tx, self.tx_poll) {
                    continue;
                }
                if !tx.enable_notification().unwrap_or(false) {
                    break;
                }
            },
            RX if ready(rx) => loop {
                // A kick on the receive queue means new buffers; the link's
                // event means new frames. Either way: fill what we can.
                let _ = rx.disable_notification();
                if !self.process_rx(p, rx)? {
                    break;
                }
                // Out of buffers: ask for a kick when the guest posts more,
                // and look once more in case it already did.
                if !rx.enable_notification().unwrap_or(false) {
                    break;
                }
            },
            CTRL if p == 0 => {
                if let Some(c) = vrings.get(CTRL).filter(|c| ready(c)) {
                    // A frontend without ring enables still hands it over.
                    if !self.ctrl_here.swap(true, Ordering::Relaxed) {
                        self.steer();
                    }
                    loop {
                        let _ = c.disable_notification();
                        self.process_ctrl(c)?;
                        if !c.enable_notification().unwrap_or(false) {
                            break;
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Connection hooks: each pair's link joins its worker's epoll set, the
/// shim reports ring enables, and the counters are logged at the end.
pub struct Hooks(pub Arc<NetBackend>);

impl backend_common::ConnectionHooks<Arc<NetBackend>> for Hooks {
    fn start(&self, handlers: &[Arc<VringEpollHandler<Arc<NetBackend>>>]) -> io::Result<()> {
        self.0.register_links(handlers)
    }

    fn end(&self) {
        self.0.log_stats();
    }

    /// QEMU's virtio-net enables rings before acknowledging features.
    fn shim(&self) -> bool {
        true
    }

    fn ring_enable(&self) -> Option<backend_common::shim::RingEnableHook> {
        let b = Arc::clone(&self.0);
        Some(Arc::new(move |index, on| b.ring_enabled(index, on)))
    }
}
