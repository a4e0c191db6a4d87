//! Guest memory for the test frontend: memfd-backed regions shared with the
//! backend through SET_MEM_TABLE, and a bump allocator for rings and buffers.
//!
//! The default layout has two regions that are contiguous in guest-physical
//! space but come from two different memfds, so a backend has to translate
//! through its memory table for each of them, and a test can place a
//! descriptor chain (or a single buffer) across the boundary.

use std::fs::File;
use std::os::fd::FromRawFd;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

/// A guest-physical address that no region covers: for hostile requests.
pub const UNMAPPED_GPA: u64 = 1 << 40;

/// Errors setting up or carving guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create failed")]
    Memfd(#[source] std::io::Error),
    #[error("sizing the memfd to {size} bytes failed")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping a guest memory region failed")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    #[error("guest memory regions are invalid")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    #[error("region at {0:#x} does not fit the address space")]
    RegionAddress(u64),
    #[error("describing region for SET_MEM_TABLE failed")]
    RegionInfo(#[source] vhost::Error),
    #[error("out of guest memory: wanted {wanted} bytes, {left} left in region {region}")]
    Exhausted {
        wanted: u64,
        left: u64,
        region: usize,
    },
    #[error("no region {0}")]
    NoRegion(usize),
}

/// memfd-backed guest memory, one memfd per region.
pub struct GuestMem {
    mem: GuestMemoryMmap,
    /// Next free guest-physical address per region (bump allocation).
    next: Vec<u64>,
}

impl GuestMem {
    /// Two contiguous regions of `region_size` bytes each, at guest address 0.
    pub fn new(region_size: u64) -> Result<Self, MemoryError> {
        Self::with_regions(&[region_size, region_size])
    }

    /// Contiguous regions of the given sizes, each backed by its own memfd.
    pub fn with_regions(sizes: &[u64]) -> Result<Self, MemoryError> {
        let mut regions = Vec::with_capacity(sizes.len());
        let mut gpa = 0u64;
        for (i, &size) in sizes.iter().enumerate() {
            let file = memfd(&format!("vu-test-guest-{i}"))?;
            file.set_len(size)
                .map_err(|source| MemoryError::Truncate { size, source })?;
            let mapping = MmapRegion::from_file(FileOffset::new(file, 0), size as usize)
                .map_err(MemoryError::Mmap)?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(gpa))
                .ok_or(MemoryError::RegionAddress(gpa))?;
            regions.push(region);
            gpa += size;
        }
        let next = regions.iter().map(|r| r.start_addr().raw_value()).collect();
        let mem = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)?;
        Ok(Self { mem, next })
    }

    /// The memory, as a backend-side crate (virtio-queue) would see it.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The regions as SET_MEM_TABLE wants them (fds stay owned by `self`).
    pub fn region_infos(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, MemoryError> {
        self.mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(MemoryError::RegionInfo)
            })
            .collect()
    }

    /// Number of regions.
    pub fn region_count(&self) -> usize {
        self.next.len()
    }

    /// Guest-physical end of region `idx` (the boundary with the next one).
    pub fn region_end(&self, idx: usize) -> Result<GuestAddress, MemoryError> {
        let r = self.mem.iter().nth(idx).ok_or(MemoryError::NoRegion(idx))?;
        Ok(r.start_addr().unchecked_add(r.len()))
    }

    /// Allocate `len` bytes aligned to `align` (a power of two) in region `idx`.
    pub fn alloc_in(
        &mut self,
        idx: usize,
        len: u64,
        align: u64,
    ) -> Result<GuestAddress, MemoryError> {
        let end = self.region_end(idx)?.raw_value();
        let next = self.next.get_mut(idx).ok_or(MemoryError::NoRegion(idx))?;
        let start = next.next_multiple_of(align.max(1));
        if start.checked_add(len).is_none_or(|e| e > end) {
            return Err(MemoryError::Exhausted {
                wanted: len,
                left: end.saturating_sub(*next),
                region: idx,
            });
        }
        *next = start + len;
        Ok(GuestAddress(start))
    }

    /// Allocate in the first region with room.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<GuestAddress, MemoryError> {
        let mut last = None;
        for idx in 0..self.next.len() {
            match self.alloc_in(idx, len, align) {
                Ok(a) => return Ok(a),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(MemoryError::NoRegion(0)))
    }

    /// Allocate `len` bytes that straddle the boundary between region `idx`
    /// and `idx + 1`: `before` bytes at the end of the first, the rest in the
    /// second. Everything after it in region `idx` is consumed.
    pub fn alloc_straddling(
        &mut self,
        idx: usize,
        len: u64,
        before: u64,
    ) -> Result<GuestAddress, MemoryError> {
        let boundary = self.region_end(idx)?.raw_value();
        let start = boundary - before;
        if self.next[idx] > start {
            return Err(MemoryError::Exhausted {
                wanted: before,
                left: boundary - self.next[idx],
                region: idx,
            });
        }
        let second = self
            .next
            .get_mut(idx + 1)
            .ok_or(MemoryError::NoRegion(idx + 1))?;
        if *second != boundary {
            return Err(MemoryError::Exhausted {
                wanted: len - before,
                left: 0,
                region: idx + 1,
            });
        }
        *second = boundary + (len - before);
        self.next[idx] = boundary;
        Ok(GuestAddress(start))
    }
}

fn memfd(name: &str) -> Result<File, MemoryError> {
    let cname = std::ffi::CString::new(name).map_err(|e| MemoryError::Memfd(e.into()))?;
    // SAFETY: cname is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn regions_are_contiguous_and_separate_fds() {
        let mem = GuestMem::new(1 << 20).unwrap();
        let infos = mem.region_infos().unwrap();
        assert_eq!(infos.len(), 2);
        assert_eq!(
            infos[1].guest_phys_addr,
            infos[0].guest_phys_addr + infos[0].memory_size
        );
        assert_ne!(infos[0].mmap_handle, infos[1].mmap_handle);
    }

    #[test]
    fn straddling_buffer_round_trips() {
        let mut mem = GuestMem::new(1 << 20).unwrap();
        let a = mem.alloc_straddling(0, 64, 16).unwrap();
        assert_eq!(a.raw_value(), (1 << 20) - 16);
        let data: Vec<u8> = (0..64).collect();
        mem.mem().write_slice(&data, a).unwrap();
        let mut back = vec![0u8; 64];
        mem.mem().read_slice(&mut back, a).unwrap();
        assert_eq!(back, data);
        // The next allocation in region 1 must not overlap the straddler.
        let b = mem.alloc_in(1, 8, 8).unwrap();
        assert!(b.raw_value() >= a.raw_value() + 64);
    }

    #[test]
    fn exhaustion_is_an_error() {
        let mut mem = GuestMem::with_regions(&[4096]).unwrap();
        mem.alloc(4000, 8).unwrap();
        assert!(matches!(
            mem.alloc(200, 8),
            Err(MemoryError::Exhausted { .. })
        ));
    }
}
