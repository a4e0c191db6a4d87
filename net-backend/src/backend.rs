//! The vhost-user side: the receive queue filled from the link, the
//! transmit queue drained into it.
//!
//! One thread serves the queue pair and the link (edge-triggered). Frames
//! move between guest memory and the link by readv/writev on iovecs that
//! point into guest memory. Receive backpressure: when the guest has posted
//! no buffers the link is not read, the queue's notifications are turned on,
//! and the guest's next kick resumes reading; nothing spins.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use backend_common::FaultCounter;
use tracing::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringState, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
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
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

const RX: usize = 0;
const TX: usize = 1;
const NUM_QUEUES: usize = 2;
/// The link's event: past the queues and the exit event.
const LINK_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// The largest frame with its header: a 64 KiB GSO packet plus Ethernet
/// and VLAN headers.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_535 + 14 + 4;
/// readv/writev take at most this many iovecs.
const MAX_IOVECS: usize = 1024;

/// What was moved and what was dropped.
#[derive(Default)]
pub struct Counters {
    pub rx_frames: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_dropped: FaultCounter,
    pub rx_errors: FaultCounter,
    pub bad_chains: FaultCounter,
}

/// The virtio-net device.
pub struct NetBackend {
    link: Arc<dyn Link>,
    mac: [u8; 6],
    mtu: u16,
    queue_size: usize,
    mem: backend_common::MemorySlot,
    event_idx: AtomicBool,
    acked: AtomicU64,
    pub counters: Counters,
}

type Mem = GuestMemoryLoadGuard<GuestMemoryMmap>;

impl NetBackend {
    pub fn new(link: Arc<dyn Link>, mac: [u8; 6], mtu: u16, queue_size: usize) -> Self {
        NetBackend {
            link,
            mac,
            mtu,
            queue_size,
            mem: backend_common::MemorySlot::default(),
            event_idx: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    /// virtio_net_config: mac, status (link up), max_virtqueue_pairs, mtu.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 12];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&1u16.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// Put the link into the worker's epoll set (edge-triggered).
    pub fn register_link(
        &self,
        handlers: &[Arc<VringEpollHandler<Arc<NetBackend>>>],
    ) -> io::Result<()> {
        if let Some(h) = handlers.first() {
            h.register_listener(
                self.link.fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                u64::from(LINK_EVENT),
            )
            .map_err(io::Error::other)?;
        }
        Ok(())
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

    /// Send every frame the guest queued.
    fn process_tx(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        let mut used = false;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
            let head = chain.head_index();
            used = true;
            let descs = chain.map(|d| (d.addr(), d.len(), d.is_write_only()));
            let iov = match tx_frame(&mem, descs) {
                Ok(v) => v,
                Err(why) => {
                    self.bad_chain(&mut state, head, why);
                    continue;
                }
            };
            match self.link.send(&iov) {
                Ok(_) => {
                    self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    // A full link drops the frame, as a wire would; the
                    // guest's TCP sends it again.
                    if let Some(count) = self.counters.tx_dropped.hit() {
                        warn!(link = self.link.name(), error = %e, count, "frame not sent");
                    }
                }
            }
            let _ = state.add_used(head, 0);
        }
        if used {
            self.notify(&mut state)?;
        }
        Ok(())
    }

    /// Fill the guest's receive buffers from the link until one runs out.
    /// Returns whether the guest ran out of buffers.
    fn process_rx(&self, vring: &VringRwLock) -> io::Result<bool> {
        let Some(mem) = self.memory() else {
            return Ok(false);
        };
        let mergeable = self.has(feature::MRG_RXBUF);
        let mut state = vring.get_mut();
        let mut used_any = false;
        let mut starved = false;
        loop {
            // Buffers for one frame: one chain, or with mergeable buffers as
            // many as it takes to hold the largest frame.
            let mut chains: Vec<(u16, Vec<libc::iovec>, usize)> = Vec::new();
            let mut room = 0usize;
            while room < MAX_FRAME {
                let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
                    break;
                };
                let head = chain.head_index();
                match buffers(&mem, chain, true) {
                    Ok(iov) => {
                        let cap: usize = iov.iter().map(|v| v.iov_len).sum();
                        if cap < VNET_HDR_LEN && chains.is_empty() {
                            self.bad_chain(
                                &mut state,
                                head,
                                "receive buffer shorter than a header",
                            );
                            used_any = true;
                            continue;
                        }
                        room += cap;
                        chains.push((head, iov, cap));
                    }
                    Err(why) => {
                        self.bad_chain(&mut state, head, why);
                        used_any = true;
                        continue;
                    }
                }
                if !mergeable {
                    break;
                }
            }
            if chains.is_empty() {
                starved = true;
                break;
            }
            let mut all: Vec<libc::iovec> = Vec::new();
            for (_, iov, _) in &chains {
                all.extend_from_slice(iov);
            }
            all.truncate(MAX_IOVECS);
            match self.link.recv(&all) {
                Ok(n) => {
                    let mut left = n;
                    let mut parts = Vec::new();
                    for (head, iov, cap) in &chains {
                        if left == 0 {
                            break;
                        }
                        let take = left.min(*cap);
                        parts.push((*head, take, iov[0]));
                        left -= take;
                    }
                    // Hand back what this frame did not need.
                    for _ in parts.len()..chains.len() {
                        state.get_queue_mut().go_to_previous_position();
                    }
                    if mergeable {
                        // num_buffers, the header's last field, before the
                        // used entries make the frame visible.
                        let first = parts[0].2;
                        let count = (parts.len() as u16).to_le_bytes();
                        write_at(first, 10, &count);
                    }
                    for (head, len, _) in parts {
                        let _ = state.add_used(head, len as u32);
                    }
                    used_any = true;
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    for _ in 0..chains.len() {
                        state.get_queue_mut().go_to_previous_position();
                    }
                    if e.kind() != io::ErrorKind::WouldBlock {
                        if let Some(count) = self.counters.rx_errors.hit() {
                            warn!(link = self.link.name(), error = %e, count, "receiving from the link");
                        }
                        if e.kind() == io::ErrorKind::InvalidData {
                            // A frame too large for the buffers was consumed;
                            // try the next one.
                            continue;
                        }
                    }
                    break;
                }
            }
        }
        if used_any {
            self.notify(&mut state)?;
        }
        Ok(starved)
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
fn buffers(
    mem: &Mem,
    chain: DescriptorChain<Mem>,
    writable: bool,
) -> Result<Vec<libc::iovec>, &'static str> {
    buffers_of(
        mem,
        chain.map(|d| (d.addr(), d.len(), d.is_write_only())),
        writable,
    )
}

/// [`buffers`] over any descriptor list: (address, length, device-writable).
pub fn buffers_of(
    mem: &GuestMemoryMmap,
    descs: impl IntoIterator<Item = (vm_memory::GuestAddress, u32, bool)>,
    writable: bool,
) -> Result<Vec<libc::iovec>, &'static str> {
    let mut v = Vec::new();
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
        if v.len() > MAX_IOVECS {
            return Err("too many buffers");
        }
    }
    if v.is_empty() {
        return Err("no buffers");
    }
    Ok(v)
}

/// The transmit path's checks on a chain: its buffers, and a length that
/// holds a header and an Ethernet header and is no larger than a frame.
pub fn tx_frame(
    mem: &GuestMemoryMmap,
    descs: impl IntoIterator<Item = (vm_memory::GuestAddress, u32, bool)>,
) -> Result<Vec<libc::iovec>, &'static str> {
    let iov = buffers_of(mem, descs, false)?;
    let len: usize = iov.iter().map(|v| v.iov_len).sum();
    if !(VNET_HDR_LEN + 14..=MAX_FRAME).contains(&len) {
        return Err("frame too short or too long");
    }
    Ok(iov)
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        feature::VERSION_1
            | feature::MAC
            | feature::MTU
            | feature::STATUS
            | feature::MRG_RXBUF
            | feature::CSUM
            | feature::GUEST_CSUM
            | feature::GUEST_TSO4
            | feature::GUEST_TSO6
            | feature::GUEST_ECN
            | feature::HOST_TSO4
            | feature::HOST_TSO6
            | feature::HOST_ECN
            | feature::INDIRECT_DESC
            | feature::EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
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
        if let Err(e) = self.link.set_offloads(flags) {
            warn!(error = %e, "cannot set the link's offloads");
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
        // The pair on one thread, with the link.
        vec![0b11]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Err(io::Error::other(format!("unexpected events {evset:?}")));
        }
        let (Some(rx), Some(tx)) = (vrings.get(RX), vrings.get(TX)) else {
            return Ok(());
        };
        // An error returned from here ends the worker thread for good, so
        // a queue that is not set up (yet, or any more) is simply skipped.
        let ready = |v: &VringRwLock| v.get_ref().get_queue().ready();
        match usize::from(device_event) {
            TX if ready(tx) => loop {
                let _ = tx.disable_notification();
                self.process_tx(tx)?;
                if !tx.enable_notification().unwrap_or(false) {
                    break;
                }
            },
            TX => {}
            _ if ready(rx) => loop {
                // A kick on the receive queue means new buffers; the link's
                // event means new frames. Either way: fill what we can.
                let _ = rx.disable_notification();
                if !self.process_rx(rx)? {
                    break;
                }
                // Out of buffers: ask for a kick when the guest posts more,
                // and look once more in case it already did.
                if !rx.enable_notification().unwrap_or(false) {
                    break;
                }
            },
            _ => {}
        }
        Ok(())
    }
}

/// Connection hooks: the link joins each new worker's epoll set.
pub struct Hooks(pub Arc<NetBackend>);

impl backend_common::ConnectionHooks<Arc<NetBackend>> for Hooks {
    fn start(&self, handlers: &[Arc<VringEpollHandler<Arc<NetBackend>>>]) -> io::Result<()> {
        self.0.register_link(handlers)
    }

    /// QEMU's virtio-net enables rings before acknowledging features.
    fn shim(&self) -> bool {
        true
    }
}
