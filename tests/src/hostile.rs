//! Requests a well-behaved guest never sends, for showing that a backend
//! answers with an error (or drops the chain) and keeps serving.
//!
//! Each helper publishes its chain and kicks, and returns the head. What the
//! backend does next is the test's business: a used entry with an error
//! status, or nothing, followed by a valid request that must still work.

use vm_memory::{Address, GuestAddress};

use crate::memory::UNMAPPED_GPA;
use crate::ring::{
    RawDesc, RingError, Seg, SplitRing, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};

fn publish(ring: &mut SplitRing, head: u16) -> Result<u16, RingError> {
    ring.push_avail(head)?;
    ring.publish()?;
    // A backend that asked for no kicks still gets one: hostile guests kick.
    ring.kick_now()?;
    Ok(head)
}

/// A chain whose first (readable) descriptor points outside guest memory,
/// followed by a sane writable buffer at `reply`.
pub fn readable_outside_memory(
    ring: &mut SplitRing,
    len: u32,
    reply: Seg,
) -> Result<u16, RingError> {
    let h = ring.add(
        &[Seg::readable(GuestAddress(UNMAPPED_GPA), len), reply],
        false,
    )?;
    publish(ring, h)
}

/// A sane readable request at `req`, then a writable descriptor outside
/// guest memory.
pub fn writable_outside_memory(ring: &mut SplitRing, req: Seg, len: u32) -> Result<u16, RingError> {
    let h = ring.add(
        &[req, Seg::writable(GuestAddress(UNMAPPED_GPA), len)],
        false,
    )?;
    publish(ring, h)
}

/// A descriptor that starts inside guest memory and runs past its end.
pub fn runs_past_end_of_memory(
    ring: &mut SplitRing,
    mem_end: GuestAddress,
    reply: Seg,
) -> Result<u16, RingError> {
    let start = mem_end.unchecked_sub(16);
    let h = ring.add(&[Seg::readable(start, 4096), reply], false)?;
    publish(ring, h)
}

/// Two descriptors whose `next` fields point at each other: a loop.
pub fn looped_chain(ring: &mut SplitRing, buf: GuestAddress) -> Result<u16, RingError> {
    let h = ring.add_raw(2, |idx| {
        vec![
            RawDesc {
                addr: buf.raw_value(),
                len: 16,
                flags: VRING_DESC_F_NEXT,
                next: idx[1],
            },
            RawDesc {
                addr: buf.raw_value(),
                len: 16,
                flags: VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                next: idx[0],
            },
        ]
    })?;
    publish(ring, h)
}

/// A descriptor whose `next` is beyond the table.
pub fn next_out_of_table(ring: &mut SplitRing, buf: GuestAddress) -> Result<u16, RingError> {
    let size = ring.size();
    let h = ring.add_raw(1, |_| {
        vec![RawDesc {
            addr: buf.raw_value(),
            len: 16,
            flags: VRING_DESC_F_NEXT,
            next: size + 7,
        }]
    })?;
    publish(ring, h)
}

/// An available-ring entry naming a head beyond the queue size.
pub fn head_out_of_range(ring: &mut SplitRing) -> Result<u16, RingError> {
    let bogus = ring.size().wrapping_add(3);
    ring.push_avail(bogus)?;
    ring.publish()?;
    ring.kick_now()?;
    Ok(bogus)
}

/// An indirect descriptor whose table lies outside guest memory.
pub fn indirect_table_outside_memory(ring: &mut SplitRing) -> Result<u16, RingError> {
    let h = ring.add_raw(1, |_| {
        vec![RawDesc {
            addr: UNMAPPED_GPA,
            len: 64,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        }]
    })?;
    publish(ring, h)
}

/// An indirect table whose length is not a multiple of 16 bytes.
pub fn indirect_table_bad_length(
    ring: &mut SplitRing,
    buf: GuestAddress,
) -> Result<u16, RingError> {
    let h = ring.add_raw(1, |_| {
        vec![RawDesc {
            addr: buf.raw_value(),
            len: 17,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        }]
    })?;
    publish(ring, h)
}

/// An indirect table whose entries loop inside the table.
pub fn indirect_loop(ring: &mut SplitRing, buf: GuestAddress) -> Result<u16, RingError> {
    let descs = [
        RawDesc {
            addr: buf.raw_value(),
            len: 16,
            flags: VRING_DESC_F_NEXT,
            next: 1,
        },
        RawDesc {
            addr: buf.raw_value(),
            len: 16,
            flags: VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            next: 0,
        },
    ];
    // The table lives in the head's private indirect slot, so take the head
    // first and fill its descriptor in once the table is written.
    let h = ring.add_raw(1, |_| vec![RawDesc::default()])?;
    let table = ring.indirect_table_for_raw(h, &descs)?;
    ring.overwrite_desc(
        h,
        RawDesc {
            addr: table.raw_value(),
            len: 32,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        },
    )?;
    publish(ring, h)
}

/// A chain with only readable descriptors, where the device must write.
pub fn no_writable_part(ring: &mut SplitRing, req: Seg) -> Result<u16, RingError> {
    let h = ring.add(&[req], false)?;
    publish(ring, h)
}

/// A chain of `n` zero-length descriptors.
pub fn zero_length(ring: &mut SplitRing, buf: GuestAddress, n: usize) -> Result<u16, RingError> {
    let segs = vec![Seg::readable(buf, 0); n];
    let h = ring.add(&segs, false)?;
    publish(ring, h)
}

/// FUSE: an in-header whose `len` claims more bytes than the chain holds.
pub fn fuse_header_len_lies(
    opcode: u32,
    unique: u64,
    nodeid: u64,
    claimed: u32,
) -> [u8; crate::fs::IN_HEADER_LEN] {
    crate::fs::in_header(claimed, opcode, unique, nodeid)
}

#[cfg(test)]
mod tests {
    //! Each helper must make a chain that virtio-queue, the parser our
    //! backends use, sees as broken: otherwise a backend test built on it
    //! would prove nothing.
    use super::*;
    use crate::memory::GuestMem;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemory;

    fn device(ring: &SplitRing) -> Queue {
        let mut q = Queue::new(ring.size()).unwrap();
        let a = ring.addrs();
        q.set_desc_table_address(Some(a.desc.raw_value() as u32), Some(0));
        q.set_avail_ring_address(Some(a.avail.raw_value() as u32), Some(0));
        q.set_used_ring_address(Some(a.used.raw_value() as u32), Some(0));
        q.set_size(ring.size());
        q.set_ready(true);
        q
    }

    fn setup() -> (GuestMem, SplitRing, GuestAddress) {
        let mut gm = GuestMem::new(1 << 20).unwrap();
        let ring = SplitRing::new(&mut gm, 16, false).unwrap();
        let buf = gm.alloc_in(1, 4096, 64).unwrap();
        (gm, ring, buf)
    }

    #[test]
    fn outside_memory_descriptor_is_unmapped() {
        let (gm, mut ring, buf) = setup();
        readable_outside_memory(&mut ring, 16, Seg::writable(buf, 1)).unwrap();
        let mut q = device(&ring);
        let chain = q.pop_descriptor_chain(gm.mem()).unwrap();
        let first = chain.into_iter().next().unwrap();
        assert!(gm.mem().check_address(first.addr()).is_none());
    }

    #[test]
    fn loops_and_bad_next_end_the_walk() {
        let (gm, mut ring, buf) = setup();
        looped_chain(&mut ring, buf).unwrap();
        next_out_of_table(&mut ring, buf).unwrap();
        let mut q = device(&ring);
        let looped = q.pop_descriptor_chain(gm.mem()).unwrap();
        assert!(looped.count() <= 16, "the walk must stop at the queue size");
        let bad_next = q.pop_descriptor_chain(gm.mem()).unwrap();
        assert_eq!(
            bad_next.count(),
            1,
            "the walk stops at the out-of-table next"
        );
    }

    #[test]
    fn head_out_of_range_yields_no_descriptor() {
        let (gm, mut ring, _) = setup();
        head_out_of_range(&mut ring).unwrap();
        let mut q = device(&ring);
        // virtio-queue either refuses the head or yields an empty chain.
        if let Some(chain) = q.pop_descriptor_chain(gm.mem()) {
            assert_eq!(chain.count(), 0);
        }
    }

    #[test]
    fn broken_indirect_tables_yield_no_descriptor() {
        let (gm, mut ring, buf) = setup();
        indirect_table_outside_memory(&mut ring).unwrap();
        indirect_table_bad_length(&mut ring, buf).unwrap();
        indirect_loop(&mut ring, buf).unwrap();
        let mut q = device(&ring);
        assert_eq!(
            q.pop_descriptor_chain(gm.mem()).unwrap().count(),
            0,
            "table outside memory"
        );
        assert_eq!(
            q.pop_descriptor_chain(gm.mem()).unwrap().count(),
            0,
            "table length not a multiple of 16"
        );
        assert!(
            q.pop_descriptor_chain(gm.mem()).unwrap().count() <= 2,
            "loop inside the table must end"
        );
    }
}
