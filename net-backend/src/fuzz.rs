//! Fuzzing the transmit path up to the link: any byte string becomes a
//! descriptor chain over a small guest memory with a hole in it, and
//! whatever the checks let through must lie inside guest memory and hold a
//! frame of a sane size. Used by the cargo-fuzz target in `fuzz/` and by a
//! seeded run in the unit tests.

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::backend::{tx_frame, MAX_FRAME};
use crate::link::VNET_HDR_LEN;

const REGIONS: [(u64, usize); 2] = [(0, 64 << 10), (128 << 10, 64 << 10)];

/// Check one input. Layout: byte 0 = descriptor count (mod 17), then 9
/// bytes per descriptor (address u32, length u32 masked, flags).
pub fn run(data: &[u8]) -> bool {
    let mem = GuestMemoryMmap::<()>::from_ranges(&REGIONS.map(|(a, l)| (GuestAddress(a), l)))
        .expect("the harness maps its memory");
    let n = data.first().copied().unwrap_or(0) as usize % 17;
    let descs: Vec<(GuestAddress, u32, bool)> = data
        .get(1..)
        .unwrap_or(&[])
        .chunks_exact(9)
        .take(n)
        .map(|d| {
            let addr = u64::from(u32::from_le_bytes([d[0], d[1], d[2], d[3]]));
            let len = u32::from_le_bytes([d[4], d[5], d[6], d[7]]) & 0x3_ffff;
            (GuestAddress(addr), len, d[8] & 1 != 0)
        })
        .collect();
    let Ok(iov) = tx_frame(&mem, descs) else {
        return false;
    };
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    assert!(
        (VNET_HDR_LEN + 14..=MAX_FRAME).contains(&total),
        "{total} bytes let through"
    );
    for v in &iov {
        let start = v.iov_base as usize;
        let inside = mem.iter().any(|r| {
            let base = r.as_ptr() as usize;
            start >= base && start + v.iov_len <= base + r.len() as usize
        });
        assert!(inside, "an iovec outside guest memory");
    }
    true
}

/// Well-formed inputs to mutate from.
pub fn seeds() -> Vec<Vec<u8>> {
    let desc = |addr: u32, len: u32, w: bool| {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.push(u8::from(w));
        d
    };
    let chain = |ds: &[Vec<u8>]| {
        let mut v = vec![ds.len() as u8];
        for d in ds {
            v.extend_from_slice(d);
        }
        v
    };
    vec![
        chain(&[desc(0, 12, false), desc(0x1000, 1514, false)]),
        chain(&[desc(0, 1526, false)]),
        // Across the hole between the regions.
        chain(&[desc(0xf000, 0x2000, false)]),
        chain(&[desc(0, 12, false), desc(0x1000, 60_000, false)]),
        chain(&[desc(0x2000, 100, true)]),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn seeds_pass_and_fail_as_they_should() {
        let v: Vec<bool> = super::seeds().iter().map(|s| super::run(s)).collect();
        assert_eq!(v, [true, true, false, true, false]);
    }

    #[test]
    fn mutated_seeds_never_panic() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds = super::seeds();
        for i in 0..20_000 {
            let mut s = seeds[i % seeds.len()].clone();
            for _ in 0..(next() % 6 + 1) {
                let r = next();
                if s.is_empty() {
                    s.push(r as u8);
                    continue;
                }
                let at = (r >> 8) as usize % s.len();
                match r % 3 {
                    0 => s[at] ^= (r >> 32) as u8,
                    1 => s.truncate(at),
                    _ => s.extend_from_slice(&r.to_le_bytes()),
                }
            }
            super::run(&s);
        }
    }
}
