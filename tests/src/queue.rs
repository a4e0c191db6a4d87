//! Request/response queues on top of the split-ring driver: each in-flight
//! request owns a slot with a readable and a writable buffer in guest memory.
//!
//! Readable buffers live in region 0 and writable ones in region 1, so every
//! chain crosses a region boundary and a backend must translate each
//! descriptor on its own.

use std::collections::HashMap;
use std::time::Duration;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::GuestMem;
use crate::ring::{RingError, Seg, SplitRing, Used};

/// How a request's chain is laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    /// Put the chain in an indirect table.
    pub indirect: bool,
    /// One descriptor for all readable parts instead of one per part.
    pub merge_readable: bool,
}

impl Shape {
    pub const DIRECT: Shape = Shape {
        indirect: false,
        merge_readable: false,
    };
    pub const INDIRECT: Shape = Shape {
        indirect: true,
        merge_readable: false,
    };
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    /// Token returned by `submit`.
    pub token: u16,
    /// Bytes the device says it wrote.
    pub len: u32,
    /// The whole writable area, whatever `len` says: a guest driver reads a
    /// status byte from where it put it, not from `len`.
    pub data: Vec<u8>,
}

impl Completion {
    /// The part of the writable area the device claims to have written.
    pub fn written(&self) -> &[u8] {
        &self.data[..(self.len as usize).min(self.data.len())]
    }
}

/// How much of the writable area a completion copies out.
#[derive(Clone, Copy, Debug)]
pub enum Copy {
    /// The whole writable area, written or not.
    All,
    /// What the device says it wrote (the used length), as a guest driver
    /// reads a reply: a large reply buffer then costs nothing extra.
    Written,
    /// The first n bytes (a reply header).
    Prefix(usize),
    /// The last byte (a virtio-blk status).
    Last,
}

struct Slot {
    rd: GuestAddress,
    wr: GuestAddress,
}

/// A virtqueue carrying requests with per-request buffers.
pub struct ReqQueue {
    ring: SplitRing,
    slots: Vec<Slot>,
    free: Vec<usize>,
    rd_cap: u32,
    wr_cap: u32,
    /// head -> (slot, writable parts)
    in_flight: HashMap<u16, (usize, Vec<(GuestAddress, u32)>)>,
    ring_mem: GuestMemoryMmap,
    pub timeout: Duration,
    /// Where readable parts after the first, and writable parts, start:
    /// a multiple of this (see [`ReqQueue::with_alignment`]).
    part_align: u64,
}

impl ReqQueue {
    /// `depth` slots of `rd_cap` readable and `wr_cap` writable bytes each.
    pub fn new(
        ring: SplitRing,
        gm: &mut GuestMem,
        depth: usize,
        rd_cap: u32,
        wr_cap: u32,
    ) -> Result<Self, RingError> {
        let second = gm.region_count().saturating_sub(1);
        let mut slots = Vec::with_capacity(depth);
        for _ in 0..depth {
            let rd = gm.alloc_in(0, u64::from(rd_cap), 64)?;
            let wr = gm.alloc_in(second, u64::from(wr_cap), 64)?;
            slots.push(Slot { rd, wr });
        }
        Ok(ReqQueue {
            ring,
            ring_mem: gm.mem().clone(),
            free: (0..depth).rev().collect(),
            slots,
            rd_cap,
            wr_cap,
            in_flight: HashMap::new(),
            timeout: Duration::from_secs(10),
            part_align: 1,
        })
    }

    /// Like [`ReqQueue::new`], with each data part (every readable part
    /// after the first, every writable part before the last) starting on
    /// a multiple of `align`, as a Linux guest hands a block device its
    /// page-cache pages. Slots grow to make room.
    pub fn with_alignment(
        ring: SplitRing,
        gm: &mut GuestMem,
        depth: usize,
        rd_cap: u32,
        wr_cap: u32,
        align: u32,
    ) -> Result<Self, RingError> {
        let pad = 2 * align;
        let second = gm.region_count().saturating_sub(1);
        let mut slots = Vec::with_capacity(depth);
        for _ in 0..depth {
            let rd = gm.alloc_in(0, u64::from(rd_cap + pad), u64::from(align))?;
            let wr = gm.alloc_in(second, u64::from(wr_cap + pad), u64::from(align))?;
            slots.push(Slot { rd, wr });
        }
        Ok(ReqQueue {
            ring,
            ring_mem: gm.mem().clone(),
            free: (0..depth).rev().collect(),
            slots,
            rd_cap,
            wr_cap,
            in_flight: HashMap::new(),
            timeout: Duration::from_secs(10),
            part_align: u64::from(align.max(1)),
        })
    }

    fn align_up(&self, a: GuestAddress) -> GuestAddress {
        GuestAddress(a.0.next_multiple_of(self.part_align))
    }

    pub fn ring(&mut self) -> &mut SplitRing {
        &mut self.ring
    }
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
    pub fn has_free_slot(&self) -> bool {
        !self.free.is_empty()
    }

    /// Copy `readable` into a slot, describe `writable` lengths, and push the
    /// chain onto the available ring without publishing it.
    pub fn push(
        &mut self,
        readable: &[&[u8]],
        writable: &[u32],
        shape: Shape,
    ) -> Result<u16, RingError> {
        let total_rd: usize = readable.iter().map(|p| p.len()).sum();
        let total_wr: u64 = writable.iter().map(|&l| u64::from(l)).sum();
        if total_rd > self.rd_cap as usize || total_wr > u64::from(self.wr_cap) {
            return Err(RingError::Full {
                wanted: total_rd.max(total_wr as usize),
                free: self.rd_cap as usize,
            });
        }
        let slot = self
            .free
            .pop()
            .ok_or(RingError::Full { wanted: 1, free: 0 })?;
        let mut segs = Vec::with_capacity(readable.len() + writable.len());
        let mut at = self.slots[slot].rd;
        let mem = &self.ring_mem;
        for (i, part) in readable.iter().enumerate() {
            if i > 0 && !shape.merge_readable {
                at = self.align_up(at);
            }
            mem.write_slice(part, at).map_err(RingError::Access)?;
            if !part.is_empty() && !shape.merge_readable {
                segs.push(Seg::readable(at, part.len() as u32));
            }
            at = at.unchecked_add(part.len() as u64);
        }
        if shape.merge_readable && total_rd > 0 {
            segs.push(Seg::readable(self.slots[slot].rd, total_rd as u32));
        }
        let mut at = self.slots[slot].wr;
        let mut parts = Vec::with_capacity(writable.len());
        for (i, &len) in writable.iter().enumerate() {
            if i + 1 < writable.len() {
                at = self.align_up(at);
            }
            segs.push(Seg::writable(at, len));
            parts.push((at, len));
            at = at.unchecked_add(u64::from(len));
        }
        let head = match self.ring.add(&segs, shape.indirect) {
            Ok(h) => h,
            Err(e) => {
                self.free.push(slot);
                return Err(e);
            }
        };
        self.ring.push_avail(head)?;
        self.in_flight.insert(head, (slot, parts));
        Ok(head)
    }

    /// Make pushed requests visible and kick if the device wants it.
    pub fn publish(&mut self) -> Result<bool, RingError> {
        self.ring.publish()
    }

    /// `push` + `publish`.
    pub fn submit(
        &mut self,
        readable: &[&[u8]],
        writable: &[u32],
        shape: Shape,
    ) -> Result<u16, RingError> {
        let h = self.push(readable, writable, shape)?;
        self.publish()?;
        Ok(h)
    }

    fn finish(&mut self, used: Used, copy: Copy) -> Result<Completion, RingError> {
        let (slot, parts) = self
            .in_flight
            .remove(&used.head)
            .ok_or(RingError::BogusUsed(u32::from(used.head)))?;
        self.free.push(slot);
        let total: u64 = parts.iter().map(|&(_, l)| u64::from(l)).sum();
        let (mut skip, n) = match copy {
            Copy::All => (0, total),
            Copy::Written => (0, total.min(u64::from(used.len))),
            Copy::Prefix(n) => (0, total.min(n as u64)),
            Copy::Last => (total.saturating_sub(1), total.min(1)),
        };
        let mut data = vec![0u8; n as usize];
        let mut got = 0usize;
        for (addr, len) in parts {
            let len = u64::from(len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let take = ((len - skip) as usize).min(data.len() - got);
            self.ring_mem
                .read_slice(&mut data[got..got + take], addr.unchecked_add(skip))
                .map_err(RingError::Access)?;
            skip = 0;
            got += take;
            if got == data.len() {
                break;
            }
        }
        Ok(Completion {
            token: used.head,
            len: used.len,
            data,
        })
    }

    /// Wait for the next completion (any order) and copy its reply out.
    pub fn wait(&mut self) -> Result<Completion, RingError> {
        self.wait_with(Copy::All)
    }

    /// Wait for the next completion, copying only part of the reply (so a
    /// benchmark's driver work stays the same whatever the reply size).
    pub fn wait_with(&mut self, copy: Copy) -> Result<Completion, RingError> {
        let used = self.ring.wait_used(self.timeout)?;
        self.finish(used, copy)
    }

    /// Submit one request and wait for its reply.
    pub fn call(
        &mut self,
        readable: &[&[u8]],
        writable: &[u32],
        shape: Shape,
    ) -> Result<Completion, RingError> {
        let token = self.submit(readable, writable, shape)?;
        let c = self.wait()?;
        if c.token != token {
            return Err(RingError::BogusUsed(u32::from(c.token)));
        }
        Ok(c)
    }

    /// Read guest memory (for tests that placed data themselves).
    pub fn read_mem(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), RingError> {
        self.ring_mem
            .read_slice(buf, addr)
            .map_err(RingError::Access)
    }
}
