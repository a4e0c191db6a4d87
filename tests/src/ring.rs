//! A guest-side split-virtqueue driver (virtio 1.x, section 2.7) on the test
//! frontend's shared memory.
//!
//! It plays the guest's part: it writes descriptor tables (direct or
//! indirect), publishes heads on the available ring, decides whether a kick
//! is needed (VIRTIO_RING_F_EVENT_IDX or the used ring's NO_NOTIFY flag), and
//! collects used entries. The device on the other side is a real backend in
//! another process, so every shared-index access is an atomic with the
//! ordering the spec asks for.

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::{GuestMem, MemoryError};

/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of indirect descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Used-ring flag: the device asks not to be kicked (without EVENT_IDX).
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;
/// Available-ring flag: the driver asks for no interrupts (without EVENT_IDX).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Most descriptors one indirect table holds in this driver.
pub const MAX_INDIRECT: u16 = 64;

/// Errors of the guest-side ring driver.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadSize(u16),
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error("guest memory access")]
    Access(#[from] vm_memory::GuestMemoryError),
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("no free descriptors: {wanted} wanted, {free} free")]
    Full { wanted: usize, free: usize },
    #[error("a chain needs at least one descriptor")]
    EmptyChain,
    #[error("an indirect table holds at most {MAX_INDIRECT} descriptors, {0} given")]
    IndirectTooLong(usize),
    #[error("the device returned head {0}, which is not in flight")]
    BogusUsed(u32),
    #[error("no used buffer within {0:?}")]
    Timeout(Duration),
}

/// One buffer of a chain, as the driver describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (the device fills it) rather than device-readable.
    pub write: bool,
}

impl Seg {
    /// A buffer the device reads.
    pub fn readable(addr: GuestAddress, len: u32) -> Self {
        Seg {
            addr,
            len,
            write: false,
        }
    }
    /// A buffer the device writes.
    pub fn writable(addr: GuestAddress, len: u32) -> Self {
        Seg {
            addr,
            len,
            write: true,
        }
    }
}

impl Seg {
    /// The table entry for this buffer, chained to `next` if there is one.
    fn desc(&self, next: Option<u16>) -> RawDesc {
        RawDesc {
            addr: self.addr.raw_value(),
            len: self.len,
            flags: if self.write { VRING_DESC_F_WRITE } else { 0 }
                | if next.is_some() { VRING_DESC_F_NEXT } else { 0 },
            next: next.unwrap_or(0),
        }
    }
}

/// A descriptor exactly as it lies in the table, for hostile chains.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A used-ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

/// The addresses a frontend passes in SET_VRING_ADDR (guest-physical here).
#[derive(Clone, Copy, Debug)]
pub struct RingAddrs {
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
}

/// The driver's view of one split virtqueue.
pub struct SplitRing {
    mem: GuestMemoryMmap,
    size: u16,
    addrs: RingAddrs,
    /// One indirect table per possible head, so indirect chains never share.
    indirect_tables: GuestAddress,
    free: Vec<u16>,
    /// Per head: how many table entries the chain holds (0 = not in flight).
    chain_len: Vec<u16>,
    next_avail: u16,
    /// Avail index at the last kick decision (for EVENT_IDX arithmetic).
    kicked_avail: u16,
    last_used: u16,
    event_idx: bool,
    kick: EventFd,
    call: EventFd,
    kicks: u64,
    /// Slots of raw chains beyond the head, returned when the head comes back.
    raw_extra: Vec<(u16, Vec<u16>)>,
}

impl SplitRing {
    /// Lay out a ring of `size` entries in region 0 of `gm`.
    pub fn new(gm: &mut GuestMem, size: u16, event_idx: bool) -> Result<Self, RingError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(RingError::BadSize(size));
        }
        let n = u64::from(size);
        let desc = gm.alloc_in(0, 16 * n, 16)?;
        let avail = gm.alloc_in(0, 6 + 2 * n, 2)?;
        let used = gm.alloc_in(0, 6 + 8 * n, 4)?;
        let indirect_tables = gm.alloc_in(0, 16 * u64::from(MAX_INDIRECT) * n, 16)?;
        let mem = gm.mem().clone();
        // Zero what a previous user of this memory may have left.
        mem.write_slice(&vec![0u8; (16 * n) as usize], desc)?;
        mem.write_slice(&vec![0u8; (6 + 2 * n) as usize], avail)?;
        mem.write_slice(&vec![0u8; (6 + 8 * n) as usize], used)?;
        let new_fd = || EventFd::new(EFD_NONBLOCK).map_err(RingError::EventFd);
        Ok(SplitRing {
            mem,
            size,
            addrs: RingAddrs { desc, avail, used },
            indirect_tables,
            free: (0..size).rev().collect(),
            chain_len: vec![0; size as usize],
            next_avail: 0,
            kicked_avail: 0,
            last_used: 0,
            event_idx,
            kick: new_fd()?,
            call: new_fd()?,
            kicks: 0,
            raw_extra: Vec::new(),
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }
    pub fn addrs(&self) -> RingAddrs {
        self.addrs
    }
    /// The eventfd the backend waits on (SET_VRING_KICK).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }
    /// The eventfd the backend signals (SET_VRING_CALL).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }
    /// How many kicks the driver has sent: with EVENT_IDX, fewer than requests.
    pub fn kicks(&self) -> u64 {
        self.kicks
    }
    /// Chains published and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.chain_len.iter().filter(|&&n| n > 0).count()
    }
    /// Descriptors free in the table.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }
    /// The avail index the driver will publish next (for SET_VRING_BASE checks).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    fn desc_addr(&self, idx: u16) -> GuestAddress {
        self.addrs.desc.unchecked_add(16 * u64::from(idx))
    }

    fn write_desc(&self, at: GuestAddress, d: RawDesc) -> Result<(), RingError> {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        self.mem.write_slice(&b, at)?;
        Ok(())
    }

    /// Write a chain into the table and return its head; not yet published.
    pub fn add(&mut self, segs: &[Seg], indirect: bool) -> Result<u16, RingError> {
        if segs.is_empty() {
            return Err(RingError::EmptyChain);
        }
        if indirect {
            if segs.len() > MAX_INDIRECT as usize {
                return Err(RingError::IndirectTooLong(segs.len()));
            }
            let head = self.take(1)?[0];
            let table = self
                .indirect_tables
                .unchecked_add(16 * u64::from(MAX_INDIRECT) * u64::from(head));
            for (i, s) in segs.iter().enumerate() {
                let next = (i + 1 < segs.len()).then(|| i as u16 + 1);
                self.write_desc(table.unchecked_add(16 * i as u64), s.desc(next))?;
            }
            let d = RawDesc {
                addr: table.raw_value(),
                len: 16 * segs.len() as u32,
                flags: VRING_DESC_F_INDIRECT,
                next: 0,
            };
            self.write_desc(self.desc_addr(head), d)?;
            self.chain_len[head as usize] = 1;
            Ok(head)
        } else {
            let idx = self.take(segs.len())?;
            for (i, s) in segs.iter().enumerate() {
                self.write_desc(self.desc_addr(idx[i]), s.desc(idx.get(i + 1).copied()))?;
            }
            self.chain_len[idx[0] as usize] = segs.len() as u16;
            Ok(idx[0])
        }
    }

    /// Write descriptors verbatim (flags and `next` untouched) into `count`
    /// free table slots; `build` gets the slot numbers and returns the
    /// entries. For chains a well-behaved driver would never make.
    pub fn add_raw(
        &mut self,
        count: usize,
        build: impl FnOnce(&[u16]) -> Vec<RawDesc>,
    ) -> Result<u16, RingError> {
        let idx = self.take(count)?;
        let descs = build(&idx);
        for (i, d) in idx.iter().zip(descs) {
            self.write_desc(self.desc_addr(*i), d)?;
        }
        self.chain_len[idx[0] as usize] = count as u16;
        // The extra slots stay reserved until the head comes back.
        self.raw_extra.push((idx[0], idx[1..].to_vec()));
        Ok(idx[0])
    }

    /// Rewrite table entry `idx` verbatim.
    pub fn overwrite_desc(&mut self, idx: u16, d: RawDesc) -> Result<(), RingError> {
        self.write_desc(self.desc_addr(idx % self.size), d)
    }

    /// A raw indirect table for `head`'s slot, for hostile indirect chains.
    pub fn indirect_table_for_raw(
        &self,
        head: u16,
        descs: &[RawDesc],
    ) -> Result<GuestAddress, RingError> {
        let table = self
            .indirect_tables
            .unchecked_add(16 * u64::from(MAX_INDIRECT) * u64::from(head));
        for (i, d) in descs.iter().take(MAX_INDIRECT as usize).enumerate() {
            self.write_desc(table.unchecked_add(16 * i as u64), *d)?;
        }
        Ok(table)
    }

    fn take(&mut self, n: usize) -> Result<Vec<u16>, RingError> {
        if n > self.free.len() {
            return Err(RingError::Full {
                wanted: n,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - n;
        let mut v = self.free.split_off(at);
        v.reverse();
        Ok(v)
    }

    /// Put `head` on the available ring (not yet visible: see `publish`).
    pub fn push_avail(&mut self, head: u16) -> Result<(), RingError> {
        let slot = self
            .addrs
            .avail
            .unchecked_add(4 + 2 * u64::from(self.next_avail % self.size));
        self.mem.write_obj(head.to_le(), slot)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(())
    }

    /// Make pushed heads visible to the device, and kick if it wants a kick.
    /// Returns whether a kick was sent.
    pub fn publish(&mut self) -> Result<bool, RingError> {
        // Descriptors and ring entries before the index (spec 2.7.13).
        fence(Ordering::Release);
        self.mem.store(
            self.next_avail.to_le(),
            self.addrs.avail.unchecked_add(2),
            Ordering::Release,
        )?;
        // The index store before reading the device's suppression state.
        fence(Ordering::SeqCst);
        let old = self.kicked_avail;
        let new = self.next_avail;
        self.kicked_avail = new;
        if new == old {
            return Ok(false);
        }
        let kick = if self.event_idx {
            let ev: u16 = self.mem.load(self.avail_event_addr(), Ordering::Acquire)?;
            need_event(u16::from_le(ev), new, old)
        } else {
            let flags: u16 = self.mem.load(self.addrs.used, Ordering::Acquire)?;
            u16::from_le(flags) & VRING_USED_F_NO_NOTIFY == 0
        };
        if kick {
            self.kick_now()?;
        }
        Ok(kick)
    }

    /// Kick regardless of suppression (a guest may always do this).
    pub fn kick_now(&mut self) -> Result<(), RingError> {
        self.kick.write(1).map_err(RingError::EventFd)?;
        self.kicks += 1;
        Ok(())
    }

    /// `add` + `push_avail` + `publish` for one chain.
    pub fn submit(&mut self, segs: &[Seg], indirect: bool) -> Result<u16, RingError> {
        let head = self.add(segs, indirect)?;
        self.push_avail(head)?;
        self.publish()?;
        Ok(head)
    }

    fn avail_event_addr(&self) -> GuestAddress {
        self.addrs.used.unchecked_add(4 + 8 * u64::from(self.size))
    }
    fn used_event_addr(&self) -> GuestAddress {
        self.addrs.avail.unchecked_add(4 + 2 * u64::from(self.size))
    }

    /// Take one used entry if the device has returned one.
    pub fn poll_used(&mut self) -> Result<Option<Used>, RingError> {
        let idx: u16 = self
            .mem
            .load(self.addrs.used.unchecked_add(2), Ordering::Acquire)?;
        if u16::from_le(idx) == self.last_used {
            return Ok(None);
        }
        // Entry reads after the index read.
        fence(Ordering::Acquire);
        let at = self
            .addrs
            .used
            .unchecked_add(4 + 8 * u64::from(self.last_used % self.size));
        let id: u32 = u32::from_le(self.mem.read_obj(at)?);
        let len: u32 = u32::from_le(self.mem.read_obj(at.unchecked_add(4))?);
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            // Ask for an interrupt as soon as the next entry lands.
            self.mem.store(
                self.last_used.to_le(),
                self.used_event_addr(),
                Ordering::Release,
            )?;
        }
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| h < self.size)
            .ok_or(RingError::BogusUsed(id))?;
        let n = self.chain_len[head as usize];
        if n == 0 {
            return Err(RingError::BogusUsed(id));
        }
        self.release(head)?;
        Ok(Some(Used { head, len }))
    }

    fn release(&mut self, head: u16) -> Result<(), RingError> {
        let n = self.chain_len[head as usize];
        self.chain_len[head as usize] = 0;
        if let Some(pos) = self.raw_extra.iter().position(|(h, _)| *h == head) {
            let (_, extra) = self.raw_extra.swap_remove(pos);
            self.free.push(head);
            self.free.extend(extra);
            return Ok(());
        }
        // Walk our own chain to return its slots; we wrote it, so it is sane.
        let mut idx = head;
        for _ in 0..n {
            self.free.push(idx);
            let flags: u16 =
                u16::from_le(self.mem.read_obj(self.desc_addr(idx).unchecked_add(12))?);
            if flags & VRING_DESC_F_NEXT == 0 {
                break;
            }
            idx = u16::from_le(self.mem.read_obj(self.desc_addr(idx).unchecked_add(14))?);
        }
        Ok(())
    }

    /// Wait (on the call eventfd, never a fixed sleep) for one used entry.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<Used, RingError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(u) = self.poll_used()? {
                return Ok(u);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RingError::Timeout(timeout));
            }
            wait_readable(&self.call, left).map_err(RingError::EventFd)?;
            // Drain the counter; the used index is the truth.
            let _ = self.call.read();
        }
    }

    /// Whether the used ring currently tells the driver not to kick.
    pub fn device_suppresses_kicks(&self) -> Result<bool, RingError> {
        let flags: u16 = self.mem.load(self.addrs.used, Ordering::Acquire)?;
        Ok(u16::from_le(flags) & VRING_USED_F_NO_NOTIFY != 0)
    }
}

/// The spec's vring_need_event: has `event` been crossed going from `old` to `new`?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// poll(2) one fd for readability, up to `timeout`.
pub fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: pfd is a valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms.max(1)) };
    match rc {
        -1 => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    //! The device side here is virtio-queue, the parser every rust-vmm
    //! backend uses, so these tests check the driver against the real thing.
    use super::*;
    use virtio_queue::{Queue, QueueT};

    fn device_queue(ring: &SplitRing) -> Queue {
        let mut q = Queue::new(ring.size()).unwrap();
        let a = ring.addrs();
        let split = |g: GuestAddress| {
            (
                Some(g.raw_value() as u32),
                Some((g.raw_value() >> 32) as u32),
            )
        };
        let (l, h) = split(a.desc);
        q.set_desc_table_address(l, h);
        let (l, h) = split(a.avail);
        q.set_avail_ring_address(l, h);
        let (l, h) = split(a.used);
        q.set_used_ring_address(l, h);
        q.set_size(ring.size());
        q.set_event_idx(ring.event_idx());
        q.set_ready(true);
        assert!(q.is_valid(&ring.mem));
        q
    }

    #[test]
    fn need_event_matches_spec_examples() {
        // Device asked for a kick when avail passes 5: 4 -> 6 crosses it.
        assert!(need_event(5, 6, 4));
        // Already past: 6 -> 8 does not cross 5.
        assert!(!need_event(5, 8, 6));
        // Wrap-around.
        assert!(need_event(u16::MAX, 1, u16::MAX - 1));
    }

    #[test]
    fn direct_chain_reaches_the_device_intact_and_comes_back() {
        let mut gm = GuestMem::new(1 << 20).unwrap();
        let mut ring = SplitRing::new(&mut gm, 16, false).unwrap();
        let rd = gm.alloc_in(0, 32, 8).unwrap();
        let wr = gm.alloc_in(1, 64, 8).unwrap();
        gm.mem().write_slice(b"hello device", rd).unwrap();
        let head = ring
            .submit(&[Seg::readable(rd, 12), Seg::writable(wr, 64)], false)
            .unwrap();
        assert_eq!(
            ring.kicks(),
            1,
            "no suppression: the first publish must kick"
        );

        let mem = gm.mem().clone();
        let mut q = device_queue(&ring);
        let chain = q.pop_descriptor_chain(&mem).expect("a chain is available");
        assert_eq!(chain.head_index(), head);
        let descs: Vec<_> = chain.clone().collect();
        assert_eq!(descs.len(), 2);
        assert_eq!(
            (descs[0].addr(), descs[0].len(), descs[0].is_write_only()),
            (rd, 12, false)
        );
        assert_eq!(
            (descs[1].addr(), descs[1].len(), descs[1].is_write_only()),
            (wr, 64, true)
        );
        let mut got = [0u8; 12];
        mem.read_slice(&mut got, descs[0].addr()).unwrap();
        assert_eq!(&got, b"hello device");
        mem.write_slice(b"reply", wr).unwrap();
        q.add_used(&mem, head, 5).unwrap();

        assert_eq!(ring.in_flight(), 1);
        let used = ring.wait_used(Duration::from_secs(1)).unwrap();
        assert_eq!(used, Used { head, len: 5 });
        assert_eq!(ring.in_flight(), 0);
        assert_eq!(
            ring.free_descriptors(),
            16,
            "both descriptors are free again"
        );
    }

    #[test]
    fn indirect_chain_is_parsed_through_its_table() {
        let mut gm = GuestMem::new(1 << 20).unwrap();
        let mut ring = SplitRing::new(&mut gm, 8, false).unwrap();
        let bufs: Vec<_> = (0..5).map(|i| gm.alloc_in(i % 2, 16, 8).unwrap()).collect();
        let segs: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, &a)| {
                if i < 2 {
                    Seg::readable(a, 16)
                } else {
                    Seg::writable(a, 16)
                }
            })
            .collect();
        let head = ring.submit(&segs, true).unwrap();
        assert_eq!(
            ring.free_descriptors(),
            7,
            "an indirect chain takes one table slot"
        );
        let mem = gm.mem().clone();
        let mut q = device_queue(&ring);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let descs: Vec<_> = chain.collect();
        assert_eq!(descs.len(), 5);
        for (d, s) in descs.iter().zip(&segs) {
            assert_eq!(
                (d.addr(), d.len(), d.is_write_only()),
                (s.addr, s.len, s.write)
            );
        }
        q.add_used(&mem, head, 0).unwrap();
        ring.wait_used(Duration::from_secs(1)).unwrap();
        assert_eq!(ring.free_descriptors(), 8);
    }

    #[test]
    fn buffers_across_the_region_boundary_are_contiguous_to_the_device() {
        let mut gm = GuestMem::new(1 << 20).unwrap();
        let mut ring = SplitRing::new(&mut gm, 8, false).unwrap();
        let straddler = gm.alloc_straddling(0, 4096, 100).unwrap();
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        gm.mem().write_slice(&data, straddler).unwrap();
        ring.submit(&[Seg::readable(straddler, 4096)], false)
            .unwrap();
        let mem = gm.mem().clone();
        let mut q = device_queue(&ring);
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let d = chain.into_iter().next().unwrap();
        let mut back = vec![0u8; d.len() as usize];
        mem.read_slice(&mut back, d.addr()).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn event_idx_suppresses_kicks_until_the_device_asks() {
        let mut gm = GuestMem::new(1 << 20).unwrap();
        let mut ring = SplitRing::new(&mut gm, 64, true).unwrap();
        let buf = gm.alloc_in(1, 4096, 8).unwrap();
        let mem = gm.mem().clone();
        let mut q = device_queue(&ring);
        // The device has seen nothing yet and asks to be told about entry 0.
        q.enable_notification(&mem).unwrap();
        for i in 0..32u64 {
            ring.submit(&[Seg::writable(buf.unchecked_add(i * 64), 64)], false)
                .unwrap();
        }
        assert_eq!(
            ring.kicks(),
            1,
            "only the first of 32 publishes crosses avail_event"
        );
        assert_eq!(ring.in_flight(), 32);
        // The device drains and re-arms; the next publish kicks again.
        let mut heads = Vec::new();
        while let Some(c) = q.pop_descriptor_chain(&mem) {
            heads.push(c.head_index());
        }
        assert_eq!(heads.len(), 32);
        q.enable_notification(&mem).unwrap();
        ring.submit(&[Seg::writable(buf, 64)], false).unwrap();
        assert_eq!(ring.kicks(), 2);
        // Completions come back in any order.
        for &h in heads.iter().rev() {
            q.add_used(&mem, h, 1).unwrap();
        }
        let mut back = Vec::new();
        for _ in 0..32 {
            back.push(ring.wait_used(Duration::from_secs(1)).unwrap().head);
        }
        heads.reverse();
        assert_eq!(back, heads);
        // The driver asked for an interrupt at its next used entry.
        let used_event: u16 = mem.read_obj(ring.used_event_addr()).unwrap();
        assert_eq!(used_event, 32);
    }

    #[test]
    fn a_full_table_is_an_error_not_a_corruption() {
        let mut gm = GuestMem::new(1 << 20).unwrap();
        let mut ring = SplitRing::new(&mut gm, 4, false).unwrap();
        let b = gm.alloc_in(0, 64, 8).unwrap();
        ring.submit(&[Seg::readable(b, 8); 3], false).unwrap();
        assert!(matches!(
            ring.add(&[Seg::readable(b, 8); 2], false),
            Err(RingError::Full { wanted: 2, free: 1 })
        ));
        assert!(matches!(ring.add(&[], false), Err(RingError::EmptyChain)));
    }

    #[test]
    fn a_bogus_used_id_is_reported() {
        let mut gm = GuestMem::new(1 << 20).unwrap();
        let mut ring = SplitRing::new(&mut gm, 4, false).unwrap();
        let mem = gm.mem().clone();
        // A device that returns a head it was never given.
        let used = ring.addrs().used;
        mem.write_obj(3u32, used.unchecked_add(4)).unwrap();
        mem.write_obj(1u16, used.unchecked_add(2)).unwrap();
        assert!(matches!(ring.poll_used(), Err(RingError::BogusUsed(3))));
    }
}
