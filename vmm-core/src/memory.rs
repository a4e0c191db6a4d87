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
}

impl GuestRam {
    /// `size` bytes (rounded up to 2 MiB) of shared, memfd-backed RAM.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < MIN_MEMORY {
            return Err(MemoryError::TooSmall(size));
        }
        let size = size.div_ceil(2 << 20) * (2 << 20);
        // SAFETY: a valid C string and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vmm-core-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size)
            .map_err(|source| MemoryError::Size { size, source })?;
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
        })
    }

    /// The end of RAM below the hole.
    pub fn low_end(&self) -> u64 {
        self.regions[0].0 + self.regions[0].1
    }
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
    }
}
