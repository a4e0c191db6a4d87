//! Fuzzing the request path up to the image: any byte string becomes a
//! descriptor chain over a small guest memory, is parsed and checked, and
//! whatever comes out must be safe to hand to an engine. Used by the
//! cargo-fuzz target in `fuzz/` and by a seeded run in the unit tests.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::request::{self, Desc, Geometry, Plan};

/// Guest memory the harness maps: two regions with a hole between, so
/// buffers can fall outside memory or straddle a gap.
const REGIONS: [(u64, usize); 2] = [(0, 64 << 10), (128 << 10, 64 << 10)];
/// The disk the requests are checked against.
pub const GEOMETRY: Geometry = Geometry {
    capacity: 1 << 20,
    logical_block_size: 512,
    readonly: false,
};

/// What a run found, for tests that want to know the input went deep.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Dropped(request::ChainError),
    Status(u8),
    Planned,
}

/// Serve one input. Layout: byte 0 = descriptor count (mod 17), then 12
/// bytes per descriptor (address u32, length u32 masked, flags), then the
/// rest is written at the start of guest memory (where the header is
/// usually put).
pub fn run(data: &[u8]) -> Verdict {
    let mem = GuestMemoryMmap::<()>::from_ranges(&REGIONS.map(|(a, l)| (GuestAddress(a), l)))
        .expect("the harness maps its memory");
    let n = data.first().copied().unwrap_or(0) as usize % 17;
    let mut descs = Vec::with_capacity(n);
    let mut at = 1;
    for _ in 0..n {
        let Some(d) = data.get(at..at + 12) else {
            break;
        };
        at += 12;
        let addr = u64::from(u32::from_le_bytes([d[0], d[1], d[2], d[3]]));
        let len = u32::from_le_bytes([d[4], d[5], d[6], d[7]]) & 0x3_ffff;
        descs.push(Desc {
            addr: GuestAddress(addr),
            len,
            writable: d[8] & 1 != 0,
        });
    }
    let rest = data.get(at..).unwrap_or(&[]);
    let fill = rest.len().min(REGIONS[0].1);
    mem.write_slice(&rest[..fill], GuestAddress(0))
        .expect("the prefix fits the first region");
    let req = match request::parse(&mem, descs) {
        Ok(r) => r,
        Err(e) => return Verdict::Dropped(e),
    };
    // Everything the parser kept is inside guest memory.
    for s in req.readable.iter().chain(&req.writable) {
        assert!(mem.check_range(s.addr, s.len as usize), "{s:?} escaped");
    }
    assert!(mem.check_address(req.status).is_some());
    match request::plan(&mem, &req, &GEOMETRY) {
        Err(st) => {
            assert!(st == request::status::IOERR || st == request::status::UNSUPP);
            Verdict::Status(st)
        }
        Ok(p) => {
            check_plan(&p);
            Verdict::Planned
        }
    }
}

/// A plan never reaches past the disk's end or outside guest memory.
fn check_plan(p: &Plan) {
    let end = |offset: u64, len: u64| {
        assert!(
            offset + len <= GEOMETRY.capacity,
            "{offset}+{len} past the end"
        );
        assert_eq!(offset % 512, 0);
        assert_eq!(len % 512, 0);
    };
    match p {
        Plan::Read { offset, bufs } | Plan::Write { offset, bufs } => {
            assert!(bufs.len() <= request::MAX_IOVECS);
            end(*offset, bufs.iter().map(|b| u64::from(b.len)).sum());
        }
        Plan::Discard { offset, len } | Plan::WriteZeroes { offset, len, .. } => end(*offset, *len),
        Plan::Flush | Plan::GetId { .. } | Plan::Nothing => {}
    }
}

/// A few well-formed inputs to start mutating from.
pub fn seeds() -> Vec<Vec<u8>> {
    let desc = |addr: u32, len: u32, writable: bool| {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&[u8::from(writable), 0, 0, 0]);
        d
    };
    let header = |typ: u32, sector: u64| {
        let mut h = typ.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        h
    };
    let chain = |descs: &[Vec<u8>], payload: Vec<u8>| {
        let mut v = vec![descs.len() as u8];
        for d in descs {
            v.extend_from_slice(d);
        }
        v.extend(payload);
        v
    };
    let mut discard = header(11, 0);
    discard.extend_from_slice(&8u64.to_le_bytes());
    discard.extend_from_slice(&16u32.to_le_bytes());
    discard.extend_from_slice(&0u32.to_le_bytes());
    vec![
        chain(
            &[
                desc(0, 16, false),
                desc(0x1000, 4096, true),
                desc(0x3000, 1, true),
            ],
            header(0, 8),
        ),
        chain(
            &[
                desc(0, 16, false),
                desc(0x1000, 512, false),
                desc(0x3000, 1, true),
            ],
            header(1, 2048),
        ),
        chain(&[desc(0, 32, false), desc(0x3000, 1, true)], discard),
        chain(
            &[
                desc(0, 16, false),
                desc(0x2000, 20, true),
                desc(0x3000, 1, true),
            ],
            header(8, 0),
        ),
        chain(&[desc(0, 16, false), desc(0x3000, 1, true)], header(4, 0)),
        // A buffer across the hole between the regions.
        chain(
            &[
                desc(0, 16, false),
                desc(0xf000, 0x2000, true),
                desc(0x3000, 1, true),
            ],
            header(0, 0),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_reach_every_verdict() {
        let v: Vec<Verdict> = seeds().iter().map(|s| run(s)).collect();
        assert!(v.contains(&Verdict::Planned));
        assert!(v.contains(&Verdict::Status(request::status::IOERR)));
        assert!(v.iter().any(|x| matches!(x, Verdict::Dropped(_))));
    }

    /// A seeded mutation run on every `cargo test`; the cargo-fuzz target
    /// explores further.
    #[test]
    fn mutated_seeds_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds = seeds();
        for i in 0..20_000 {
            let mut s = seeds[i % seeds.len()].clone();
            for _ in 0..(next() % 6 + 1) {
                let r = next();
                match r % 4 {
                    0 if !s.is_empty() => {
                        let at = (r >> 8) as usize % s.len();
                        s[at] ^= (r >> 32) as u8;
                    }
                    1 if !s.is_empty() => {
                        let at = (r >> 8) as usize % s.len();
                        s.truncate(at);
                    }
                    2 => s.extend_from_slice(&r.to_le_bytes()),
                    _ if s.len() > 4 => {
                        let at = (r >> 8) as usize % (s.len() - 4);
                        s[at..at + 4].copy_from_slice(&((r >> 16) as u32).to_le_bytes());
                    }
                    _ => {}
                }
            }
            run(&s);
        }
    }
}
