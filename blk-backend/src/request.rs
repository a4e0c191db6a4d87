//! virtio-blk requests (virtio 1.2, section 5.2.6): from a descriptor chain
//! to a checked plan, without touching the image.
//!
//! A chain is a device-readable header (type, reserved, sector), then data
//! (readable for writes, discards and write-zeroes; writable for reads and
//! GET_ID), then one writable status byte. Two kinds of failure differ:
//! - the chain itself is unusable (no header, no status byte, a buffer
//!   outside guest memory): there is nowhere to put an answer, so the chain
//!   is returned with nothing written ([`ChainError`]);
//! - the request is well formed but cannot be done (beyond the end, wrong
//!   length, read-only disk, unknown type): the status byte says so.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Request types.
pub mod kind {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// The sector unit of the protocol, whatever the logical block size.
pub const SECTOR: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// preadv/pwritev and io_uring take at most this many iovecs (UIO_MAXIOV).
pub const MAX_IOVECS: usize = 1024;
/// Segments accepted in one discard or write-zeroes request (the config
/// space says so to the driver).
pub const MAX_RANGE_SEGMENTS: usize = 1;
/// Largest discard, in sectors (4 GiB minus a sector's worth).
pub const MAX_DISCARD_SECTORS: u32 = 0x7f_ffff;
/// Largest write-zeroes, in sectors (64 MiB: written as zeros in one
/// request where the filesystem cannot zero a range itself).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 0x2_0000;

/// Why a chain cannot be answered at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the chain has {0} readable bytes, fewer than a request header")]
    ShortHeader(u64),
    #[error("the chain has no writable byte for the status")]
    NoStatus,
    #[error("a readable descriptor follows a writable one")]
    Order,
    #[error("a descriptor at {addr:#x} (+{len}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
}

/// A guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A parsed chain: every buffer is inside guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    /// Readable data after the header.
    pub readable: Vec<Segment>,
    /// Writable data before the status byte.
    pub writable: Vec<Segment>,
    pub status: GuestAddress,
}

impl Request {
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// One descriptor, as the parser needs it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

/// Parse the descriptors of one chain.
pub fn parse<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: impl IntoIterator<Item = Desc>,
) -> Result<Request, ChainError> {
    let mut readable = Vec::new();
    let mut writable: Vec<Segment> = Vec::new();
    for d in descs {
        if d.len == 0 {
            continue;
        }
        if !mem.check_range(d.addr, d.len as usize) {
            return Err(ChainError::OutsideMemory {
                addr: d.addr.0,
                len: d.len,
            });
        }
        let seg = Segment {
            addr: d.addr,
            len: d.len,
        };
        if d.writable {
            writable.push(seg);
        } else if writable.is_empty() {
            readable.push(seg);
        } else {
            return Err(ChainError::Order);
        }
    }
    // The header: the first 16 readable bytes, wherever the driver split them.
    let mut header = [0u8; 16];
    let mut got = 0usize;
    let mut consumed = 0usize; // whole readable segments used by the header
    let mut rest_of_partial: Option<Segment> = None;
    for s in &readable {
        let take = (header.len() - got).min(s.len as usize);
        mem.read_slice(&mut header[got..got + take], s.addr)
            .map_err(|_| ChainError::OutsideMemory {
                addr: s.addr.0,
                len: s.len,
            })?;
        got += take;
        consumed += 1;
        if take < s.len as usize {
            rest_of_partial = Some(Segment {
                addr: s.addr.unchecked_add(take as u64),
                len: s.len - take as u32,
            });
        }
        if got == header.len() {
            break;
        }
    }
    if got < header.len() {
        let total = readable.iter().map(|s| u64::from(s.len)).sum();
        return Err(ChainError::ShortHeader(total));
    }
    let mut data: Vec<Segment> = rest_of_partial.into_iter().collect();
    data.extend_from_slice(&readable[consumed..]);
    // The status: the last writable byte.
    let last = writable.last_mut().ok_or(ChainError::NoStatus)?;
    let status = last.addr.unchecked_add(u64::from(last.len) - 1);
    last.len -= 1;
    if last.len == 0 {
        writable.pop();
    }
    Ok(Request {
        kind: u32::from_le_bytes([header[0], header[1], header[2], header[3]]),
        sector: u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8])),
        readable: data,
        writable,
        status,
    })
}

/// The disk as requests see it.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Bytes, a multiple of the logical block size.
    pub capacity: u64,
    pub logical_block_size: u32,
    pub readonly: bool,
}

/// What to do for a request that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Read {
        offset: u64,
        bufs: Vec<Segment>,
    },
    Write {
        offset: u64,
        bufs: Vec<Segment>,
    },
    Flush,
    /// Write the serial into the buffers.
    GetId {
        bufs: Vec<Segment>,
    },
    /// Deallocate: reads return zeros afterwards.
    Discard {
        offset: u64,
        len: u64,
    },
    /// Zero a range; `unmap` allows deallocating it.
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    /// Nothing to do (a read-only disk's flush, a zero-length transfer).
    Nothing,
}

/// Check `req` against the disk. Errors are the status byte to answer.
pub fn plan<M: GuestMemory + ?Sized>(mem: &M, req: &Request, g: &Geometry) -> Result<Plan, u8> {
    match req.kind {
        kind::IN | kind::OUT => {
            let (bufs, len) = if req.kind == kind::IN {
                (&req.writable, req.writable_len())
            } else {
                (&req.readable, req.readable_len())
            };
            if req.kind == kind::OUT && g.readonly {
                return Err(status::IOERR);
            }
            let offset = range(req.sector, len, g)?;
            if bufs.len() > MAX_IOVECS {
                return Err(status::IOERR);
            }
            if len == 0 {
                return Ok(Plan::Nothing);
            }
            Ok(if req.kind == kind::IN {
                Plan::Read {
                    offset,
                    bufs: bufs.clone(),
                }
            } else {
                Plan::Write {
                    offset,
                    bufs: bufs.clone(),
                }
            })
        }
        kind::FLUSH if g.readonly => Ok(Plan::Nothing),
        kind::FLUSH => Ok(Plan::Flush),
        kind::GET_ID => Ok(Plan::GetId {
            bufs: req.writable.clone(),
        }),
        kind::DISCARD | kind::WRITE_ZEROES => {
            if g.readonly {
                return Err(status::IOERR);
            }
            let n = req.readable_len();
            if n == 0 || n % 16 != 0 || n / 16 > MAX_RANGE_SEGMENTS as u64 {
                return Err(status::IOERR);
            }
            let mut seg = [0u8; 16];
            read_gathered(mem, &req.readable, &mut seg).map_err(|_| status::IOERR)?;
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
            let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
            let (max, allowed_flags) = if req.kind == kind::DISCARD {
                (MAX_DISCARD_SECTORS, 0)
            } else {
                (MAX_WRITE_ZEROES_SECTORS, 1)
            };
            // Unknown flags (and unmap on a discard) are UNSUPP, as the
            // specification asks.
            if flags & !allowed_flags != 0 {
                return Err(status::UNSUPP);
            }
            if sectors > max {
                return Err(status::IOERR);
            }
            let len = u64::from(sectors) * SECTOR;
            let offset = range(sector, len, g)?;
            if len == 0 {
                return Ok(Plan::Nothing);
            }
            Ok(if req.kind == kind::DISCARD {
                Plan::Discard { offset, len }
            } else {
                Plan::WriteZeroes {
                    offset,
                    len,
                    unmap: flags & 1 != 0,
                }
            })
        }
        _ => Err(status::UNSUPP),
    }
}

/// The byte offset of `len` bytes at `sector`, if they lie inside the disk
/// and on logical-block boundaries.
fn range(sector: u64, len: u64, g: &Geometry) -> Result<u64, u8> {
    let lbs = u64::from(g.logical_block_size);
    let offset = sector.checked_mul(SECTOR).ok_or(status::IOERR)?;
    let end = offset.checked_add(len).ok_or(status::IOERR)?;
    if len % SECTOR != 0 || offset % lbs != 0 || len % lbs != 0 || end > g.capacity {
        return Err(status::IOERR);
    }
    Ok(offset)
}

/// Read `out.len()` bytes spread over `segs`.
fn read_gathered<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    out: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut got = 0;
    for s in segs {
        if got == out.len() {
            break;
        }
        let take = (out.len() - got).min(s.len as usize);
        mem.read_slice(&mut out[got..got + take], s.addr)?;
        got += take;
    }
    Ok(())
}

/// Write `data` into `segs`, as far as they reach. Returns bytes written.
pub fn write_gathered<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    data: &[u8],
) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut put = 0;
    for s in segs {
        if put == data.len() {
            break;
        }
        let take = (data.len() - put).min(s.len as usize);
        mem.write_slice(&data[put..put + take], s.addr)?;
        put += take;
    }
    Ok(put)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            writable: false,
        }
    }
    fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            writable: true,
        }
    }

    fn header(m: &GuestMemoryMmap, at: u64, typ: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&typ.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
    }

    const G: Geometry = Geometry {
        capacity: 1 << 20,
        logical_block_size: 512,
        readonly: false,
    };

    #[test]
    fn linux_read_layout() {
        let m = mem();
        header(&m, 0, kind::IN, 8);
        let req = parse(&m, [r(0, 16), w(0x1000, 4096), w(0x2000, 1)]).unwrap();
        assert_eq!(req.kind, kind::IN);
        assert_eq!(req.sector, 8);
        assert_eq!(req.writable_len(), 4096);
        assert_eq!(req.status, GuestAddress(0x2000));
        assert_eq!(
            plan(&m, &req, &G).unwrap(),
            Plan::Read {
                offset: 4096,
                bufs: vec![Segment {
                    addr: GuestAddress(0x1000),
                    len: 4096
                }]
            }
        );
    }

    #[test]
    fn header_and_data_in_one_descriptor_and_status_inside_data() {
        let m = mem();
        header(&m, 0x100, kind::OUT, 2);
        let req = parse(&m, [r(0x100, 16 + 512), w(0x3000, 1)]).unwrap();
        assert_eq!(
            req.readable,
            vec![Segment {
                addr: GuestAddress(0x110),
                len: 512
            }]
        );
        // A read whose status byte ends its data descriptor.
        header(&m, 0, kind::IN, 0);
        let req = parse(&m, [r(0, 8), r(8, 8), w(0x1000, 513)]).unwrap();
        assert_eq!(req.writable_len(), 512);
        assert_eq!(req.status, GuestAddress(0x1200));
    }

    #[test]
    fn unusable_chains() {
        let m = mem();
        assert_eq!(
            parse(&m, [r(0, 8), w(0x1000, 1)]),
            Err(ChainError::ShortHeader(8))
        );
        assert_eq!(parse(&m, [r(0, 16)]), Err(ChainError::NoStatus));
        assert_eq!(
            parse(&m, [r(0, 16), w(0x1000, 1), r(0x2000, 16)]),
            Err(ChainError::Order)
        );
        assert!(matches!(
            parse(&m, [r(0, 16), w((1 << 20) - 100, 4096), w(0x1000, 1)]),
            Err(ChainError::OutsideMemory { .. })
        ));
    }

    #[test]
    fn statuses() {
        let m = mem();
        let check = |typ: u32, sector: u64, descs: &[Desc], g: &Geometry| {
            header(&m, 0, typ, sector);
            let req = parse(&m, descs.iter().copied()).unwrap();
            plan(&m, &req, g)
        };
        let read = |len| [r(0, 16), w(0x1000, len), w(0x9000, 1)];
        // Beyond the end, straddling the end, not a whole sector.
        assert_eq!(check(kind::IN, 2048, &read(512), &G), Err(status::IOERR));
        assert_eq!(check(kind::IN, 2047, &read(1024), &G), Err(status::IOERR));
        assert_eq!(check(kind::IN, 0, &read(100), &G), Err(status::IOERR));
        assert_eq!(
            check(kind::IN, u64::MAX, &read(512), &G),
            Err(status::IOERR)
        );
        // A 4 KiB-block disk refuses 512-byte pieces.
        let g4k = Geometry {
            logical_block_size: 4096,
            ..G
        };
        assert_eq!(check(kind::IN, 1, &read(4096), &g4k), Err(status::IOERR));
        assert!(check(kind::IN, 8, &read(4096), &g4k).is_ok());
        // Read-only.
        let ro = Geometry {
            readonly: true,
            ..G
        };
        let write = [r(0, 16), r(0x1000, 512), w(0x9000, 1)];
        assert_eq!(check(kind::OUT, 0, &write, &ro), Err(status::IOERR));
        assert_eq!(
            check(kind::FLUSH, 0, &[r(0, 16), w(0x9000, 1)], &ro),
            Ok(Plan::Nothing)
        );
        // Unknown types.
        assert_eq!(check(0x7777, 0, &read(512), &G), Err(status::UNSUPP));
        assert_eq!(check(10, 0, &read(512), &G), Err(status::UNSUPP));
    }

    #[test]
    fn ranges() {
        let m = mem();
        let seg = |sector: u64, n: u32, flags: u32| {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&n.to_le_bytes());
            s[12..16].copy_from_slice(&flags.to_le_bytes());
            m.write_slice(&s, GuestAddress(0x1000)).unwrap();
        };
        let descs = [r(0, 16), r(0x1000, 16), w(0x9000, 1)];
        let check = |typ| {
            header(&m, 0, typ, 0);
            plan(&m, &parse(&m, descs).unwrap(), &G)
        };
        seg(8, 16, 0);
        assert_eq!(
            check(kind::DISCARD),
            Ok(Plan::Discard {
                offset: 4096,
                len: 8192
            })
        );
        seg(8, 16, 1);
        assert_eq!(check(kind::DISCARD), Err(status::UNSUPP));
        assert_eq!(
            check(kind::WRITE_ZEROES),
            Ok(Plan::WriteZeroes {
                offset: 4096,
                len: 8192,
                unmap: true
            })
        );
        seg(8, 16, 2);
        assert_eq!(check(kind::WRITE_ZEROES), Err(status::UNSUPP));
        seg(2040, 16, 0);
        assert_eq!(check(kind::DISCARD), Err(status::IOERR));
        // Two segments where one is allowed, and a ragged segment list.
        header(&m, 0, kind::DISCARD, 0);
        let two = parse(&m, [r(0, 16), r(0x1000, 32), w(0x9000, 1)]).unwrap();
        assert_eq!(plan(&m, &two, &G), Err(status::IOERR));
        let ragged = parse(&m, [r(0, 16), r(0x1000, 10), w(0x9000, 1)]).unwrap();
        assert_eq!(plan(&m, &ragged, &G), Err(status::IOERR));
    }
}
