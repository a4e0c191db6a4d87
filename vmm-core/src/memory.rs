//! Guest RAM: memfd-backed and shared, so vhost-user backends can map it
//! through the descriptors SET_MEM_TABLE passes them. Below 4 GiB the RAM
//! stops at [`MMIO_HOLE_START`], leaving the usual hole for devices; what
//! does not fit there continues at 4 GiB as a second region.

use std::os::fd::{FromRawFd, OwnedFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Where the 32-bit MMIO hole starts (3 GiB): devices live above it.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Where RAM resumes above the hole.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// The least memory a VM may have.
pub const MIN_MEMORY: u64 = 16 << 20;

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{0} bytes of memory is too little; give the VM at least 16 MiB")]
    TooSmall(u64),
    #[error("creating the memfd for guest memory")]
    Memfd(#[source] std::io::Error),
    #[error("creating guest memory in 2 MiB huge pages (a kernel without hugetlbfs?); leave out --hugepages")]
    HugeMemfd(#[source] std::io::Error),
    #[error(
        "{size} bytes of guest memory in 2 MiB huge pages: the host has {free} free; \
         reserve more (sysctl vm.nr_hugepages={want}) or leave out --hugepages"
    )]
    HugePages { size: u64, free: u64, want: u64 },
    #[error("sizing guest memory to {size} bytes")]
    Size {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping guest memory: {0}")]
    Map(String),
}

/// (guest address, size) of each RAM region for `size` bytes of memory.
pub fn layout(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (HIGH_RAM_START, size - MMIO_HOLE_START),
        ]
    }
}

/// Guest RAM and the memfd behind it (one file, each region at its offset).
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    pub memfd: std::sync::Arc<std::fs::File>,
    pub regions: Vec<(u64, u64)>,
    /// With huge pages: a mapping that holds the file's pages reserved.
    _reservation: Option<Reservation>,
}

/// A shared mapping of a hugetlbfs file made without MAP_NORESERVE, which
/// makes the kernel set aside every huge page of it at once (or refuse).
/// The mappings vm-memory makes use MAP_NORESERVE: on their own, a host
/// short of huge pages would let the mapping succeed and kill the VMM with
/// SIGBUS at the first page it could not have.
struct Reservation {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is never accessed (PROT_NONE), only unmapped.
unsafe impl Send for Reservation {}
// SAFETY: as above.
unsafe impl Sync for Reservation {}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `reserve`, unmapped once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

fn reserve(file: &std::fs::File, size: u64) -> Option<Reservation> {
    // SAFETY: a new mapping of a file we own; the result is checked.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_NONE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(file),
            0,
        )
    };
    (addr != libc::MAP_FAILED).then_some(Reservation {
        addr,
        len: size as usize,
    })
}

impl GuestRam {
    /// `size` bytes (rounded up to 2 MiB) of shared, memfd-backed RAM.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::with_pages(size, false)
    }

    /// As [`GuestRam::new`], in 2 MiB huge pages (hugetlbfs) where `huge`:
    /// the kernel loads into memory that takes one fault per 2 MiB instead
    /// of per 4 KiB, and the guest's TLB reach grows the same way. The
    /// pages come from the host's reserve (vm.nr_hugepages), all of them at
    /// once when the memory is mapped.
    pub fn with_pages(size: u64, huge: bool) -> Result<Self, MemoryError> {
        if size < MIN_MEMORY {
            return Err(MemoryError::TooSmall(size));
        }
        let size = size.div_ceil(2 << 20) * (2 << 20);
        let mut flags = libc::MFD_CLOEXEC;
        if huge {
            flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
        }
        // SAFETY: a valid C string and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vmm-core-guest-ram".as_ptr(), flags) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match huge {
                true => MemoryError::HugeMemfd(e),
                false => MemoryError::Memfd(e),
            });
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size)
            .map_err(|source| MemoryError::Size { size, source })?;
        let huge_error = || {
            let free = free_huge_pages();
            MemoryError::HugePages {
                size,
                free,
                want: size / (2 << 20) + total_huge_pages().saturating_sub(free),
            }
        };
        let reservation = match huge {
            true => Some(reserve(&file, size).ok_or_else(huge_error)?),
            false => None,
        };
        let file = std::sync::Arc::new(file);
        let regions = layout(size);
        let mut offset = 0;
        let ranges: Vec<_> = regions
            .iter()
            .map(|&(addr, len)| {
                let r = (
                    GuestAddress(addr),
                    len as usize,
                    Some(FileOffset::from_arc(std::sync::Arc::clone(&file), offset)),
                );
                offset += len;
                r
            })
            .collect();
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges)
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestRam {
            mem,
            memfd: file,
            regions,
            _reservation: reservation,
        })
    }

    /// Whether the memory is in huge pages.
    pub fn huge_pages(&self) -> bool {
        // SAFETY: fstatfs fills a statfs; the descriptor is ours.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let r = unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(&*self.memfd), &mut st) };
        r == 0 && st.f_type == libc::HUGETLBFS_MAGIC
    }

    /// The end of RAM below the hole.
    pub fn low_end(&self) -> u64 {
        self.regions[0].0 + self.regions[0].1
    }
}

/// A /proc/meminfo count of 2 MiB huge pages (0 if unreadable).
fn meminfo_pages(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Huge pages the host has free now.
pub fn free_huge_pages() -> u64 {
    meminfo_pages("HugePages_Free:")
}

fn total_huge_pages() -> u64 {
    meminfo_pages("HugePages_Total:")
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemory};

    #[test]
    fn memory_above_three_gib_moves_past_the_hole() {
        assert_eq!(layout(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            layout(4 << 30),
            vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, 1 << 30)]
        );
    }

    #[test]
    fn ram_is_shared_through_the_memfd() {
        let ram = GuestRam::new(32 << 20).unwrap();
        assert_eq!(ram.mem.num_regions(), 1);
        ram.mem.write_obj(0xabcd_u32, GuestAddress(0x1000)).unwrap();
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&*ram.memfd, &mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xabcd);
        assert!(matches!(
            GuestRam::new(1 << 20),
            Err(MemoryError::TooSmall(_))
        ));
        assert!(!ram.huge_pages());
    }

    #[test]
    fn huge_page_memory_is_hugetlbfs_or_a_clear_error() {
        match GuestRam::with_pages(32 << 20, true) {
            Ok(ram) => {
                assert!(ram.huge_pages());
                ram.mem.write_obj(7u64, GuestAddress(0x20_0000)).unwrap();
                let mut b = [0u8; 8];
                std::os::unix::fs::FileExt::read_exact_at(&*ram.memfd, &mut b, 0x20_0000).unwrap();
                assert_eq!(u64::from_le_bytes(b), 7);
            }
            Err(MemoryError::HugePages { free, want, .. }) => {
                assert!(free < 16 && want >= 16, "free {free}, want {want}");
                backend_common::skip_or_fail(&format!(
                    "huge page memory: {free} free (sysctl vm.nr_hugepages=16)"
                ));
            }
            Err(e) => panic!("{e}"),
        }
        // More than the host has is refused up front, not a SIGBUS later.
        let free = free_huge_pages();
        let too_much = (free + 1) * (2 << 20);
        match GuestRam::with_pages(too_much.max(MIN_MEMORY), true) {
            Err(MemoryError::HugePages { .. }) => {}
            Ok(_) if free + 1 < 8 => {} // MIN_MEMORY fitted after all
            other => panic!("{:?}", other.map(|r| r.regions)),
        }
    }
}
