//! Bounce buffers for O_DIRECT on disks that pay per segment.
//!
//! An O_DIRECT transfer reaches the disk as one segment per physically
//! contiguous run of its buffer. Guest memory is shared memory in 4 KiB
//! pages, so a guest's 1 MiB read is 256 segments. On a virtio disk whose
//! ring has no indirect descriptors (common for VMs inside VMs) each
//! segment takes a slot of that ring, and one such read fills a 256-slot
//! ring alone: the disk works on one request at a time. Read into, or
//! written from, a 2 MiB transparent huge page instead, the same transfer
//! is one segment and the disk takes several at once; the copy to or from
//! guest memory costs far less than that saves (BENCHMARKS.md has the
//! numbers for this machine's disk).
//!
//! Each queue owns a [`Pool`] of huge pages, mapped when first wanted, cut
//! into 64 KiB granules; a transfer takes a run of granules inside one page.
//! When the pool is out of room the transfer goes straight to guest memory,
//! as without bouncing.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::IoVecs;

/// One huge page.
pub const PAGE_BYTES: usize = 2 << 20;
/// The unit a page is handed out in.
pub const GRANULE: usize = 64 << 10;
const GRANULES: u32 = (PAGE_BYTES / GRANULE) as u32;

/// Part of a pool page lent to one transfer.
#[derive(Debug)]
pub struct Slot {
    page: usize,
    first: u32,
    count: u32,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a slot is an address range in a mapping owned by the pool of the
// queue whose request holds the slot; the mapping outlives the slot (it is
// only unmapped when the pool goes, with the queue).
unsafe impl Send for Slot {}

impl Slot {
    /// The slot as a one-element iovec list, for the engine.
    pub fn iovecs(&self) -> IoVecs {
        IoVecs(vec![libc::iovec {
            iov_base: self.ptr.as_ptr().cast(),
            iov_len: self.len,
        }])
    }

    /// Copy the first `n` bytes of the slot into `to` (guest buffers).
    pub fn copy_out(&self, to: &IoVecs, n: usize) {
        let mut off = 0;
        let n = n.min(self.len);
        for v in &to.0 {
            if off >= n {
                break;
            }
            let k = v.iov_len.min(n - off);
            // SAFETY: the slot holds `len` bytes of our own mapping; the
            // iovec points into guest memory the request keeps mapped; the
            // two never overlap (ours is private anonymous memory).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.ptr.as_ptr().add(off),
                    v.iov_base.cast::<u8>(),
                    k,
                )
            };
            off += k;
        }
    }

    /// Fill the slot from `from` (guest buffers); returns the bytes copied.
    pub fn copy_in(&mut self, from: &IoVecs) -> usize {
        let mut off = 0;
        for v in &from.0 {
            let k = v.iov_len.min(self.len - off);
            // SAFETY: as in copy_out, the other way round.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base.cast::<u8>(),
                    self.ptr.as_ptr().add(off),
                    k,
                )
            };
            off += k;
            if off == self.len {
                break;
            }
        }
        off
    }
}

struct Page {
    base: NonNull<u8>,
    /// Granules in use, one bit each.
    used: u32,
}

/// One queue's bounce pages.
pub struct Pool {
    pages: Vec<Page>,
    max_pages: usize,
    /// Mapping a page failed once: stop trying.
    failed: bool,
    /// Refuse pages that are not one huge page (always, but in tests of
    /// the bookkeeping).
    require_huge: bool,
}

// SAFETY: the pages are private anonymous mappings owned by the pool; the
// pool is used by one queue thread at a time (under the queue's lock).
unsafe impl Send for Pool {}

impl Pool {
    /// A pool of at most `max_pages` huge pages, none mapped yet.
    pub fn new(max_pages: usize) -> Self {
        Pool {
            pages: Vec::new(),
            max_pages,
            failed: false,
            require_huge: true,
        }
    }

    /// A pool that takes whatever pages the kernel gives, for tests of its
    /// bookkeeping on hosts short of huge pages.
    #[cfg(test)]
    fn any_pages(max_pages: usize) -> Self {
        let mut p = Pool::new(max_pages);
        p.require_huge = false;
        p
    }

    /// Room for a transfer of `len` bytes, or None (too large, or the pool
    /// is full).
    pub fn take(&mut self, len: usize) -> Option<Slot> {
        if len == 0 || len > PAGE_BYTES {
            return None;
        }
        let count = len.div_ceil(GRANULE) as u32;
        let mask = run_mask(count);
        for (i, p) in self.pages.iter_mut().enumerate() {
            for first in 0..=(GRANULES - count) {
                if p.used & (mask << first) == 0 {
                    p.used |= mask << first;
                    return Some(slot(i, p.base, first, count, len));
                }
            }
        }
        if self.failed || self.pages.len() >= self.max_pages {
            return None;
        }
        match map_huge_page(self.require_huge) {
            Ok(base) => {
                self.pages.push(Page { base, used: mask });
                Some(slot(self.pages.len() - 1, base, 0, count, len))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot map a bounce page; transfers go straight to guest memory");
                self.failed = true;
                None
            }
        }
    }

    /// Return a slot whose transfer has completed.
    pub fn give(&mut self, s: Slot) {
        if let Some(p) = self.pages.get_mut(s.page) {
            p.used &= !(run_mask(s.count) << s.first);
        }
    }

    /// Granules lent out now.
    #[cfg(test)]
    fn in_use(&self) -> u32 {
        self.pages.iter().map(|p| p.used.count_ones()).sum()
    }

    /// Pages mapped so far.
    #[cfg(test)]
    fn pages(&self) -> usize {
        self.pages.len()
    }
}

/// `count` granules' bits (1 to GRANULES), from bit 0.
fn run_mask(count: u32) -> u32 {
    u32::MAX >> (GRANULES - count)
}

impl Drop for Pool {
    fn drop(&mut self) {
        for p in &self.pages {
            // SAFETY: our own mapping of PAGE_BYTES; no transfer uses it any
            // more (the queue that owned the pool is gone).
            unsafe { libc::munmap(p.base.as_ptr().cast(), PAGE_BYTES) };
        }
    }
}

fn slot(page: usize, base: NonNull<u8>, first: u32, count: u32, len: usize) -> Slot {
    // SAFETY: first + count <= GRANULES, so the offset stays in the page.
    let ptr = unsafe { base.add(first as usize * GRANULE) };
    Slot {
        page,
        first,
        count,
        ptr,
        len,
    }
}

/// A 2 MiB-aligned anonymous mapping of one huge page, asked to be backed
/// by a transparent huge page and faulted in now.
fn map_huge_page(require_huge: bool) -> io::Result<NonNull<u8>> {
    let span = 2 * PAGE_BYTES;
    // SAFETY: a fresh private anonymous mapping; checked below.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(PAGE_BYTES);
    // SAFETY: unmapping the parts of our own fresh mapping before and after
    // the aligned page; both ranges lie inside it.
    unsafe {
        if aligned > start {
            libc::munmap(raw, aligned - start);
        }
        let end = aligned + PAGE_BYTES;
        if start + span > end {
            libc::munmap(end as *mut libc::c_void, start + span - end);
        }
        libc::madvise(
            aligned as *mut libc::c_void,
            PAGE_BYTES,
            libc::MADV_HUGEPAGE,
        );
        // Fault the page in here, so the first transfer does not wait for
        // the kernel to find a huge page.
        std::ptr::write_volatile(aligned as *mut u8, 0);
    }
    if require_huge {
        if let Err(e) = ensure_huge(aligned) {
            // SAFETY: the aligned page is ours, and nothing uses it yet.
            unsafe { libc::munmap(aligned as *mut libc::c_void, PAGE_BYTES) };
            return Err(e);
        }
    }
    NonNull::new(aligned as *mut u8).ok_or_else(|| io::Error::other("mmap returned null"))
}

/// Make sure the page at `addr` is one huge page: MADV_COLLAPSE (Linux
/// 6.1+) succeeds for a page that is one already and makes one of it
/// otherwise, or says that none is to be had now (memory too fragmented).
/// A page of 4 KiB pieces would cost a copy per transfer and save nothing.
/// A kernel without MADV_COLLAPSE cannot tell: the page is taken as the
/// fault left it.
fn ensure_huge(addr: usize) -> io::Result<()> {
    for _ in 0..2 {
        // SAFETY: advice on our own mapping of PAGE_BYTES.
        let rc =
            unsafe { libc::madvise(addr as *mut libc::c_void, PAGE_BYTES, libc::MADV_COLLAPSE) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Busy for a moment (the specification of the call says to
            // try once more).
            Some(libc::EAGAIN) => continue,
            // No MADV_COLLAPSE here.
            Some(libc::EINVAL) => return Ok(()),
            _ => return Err(io::Error::new(e.kind(), format!("no huge page: {e}"))),
        }
    }
    Err(io::Error::other("no huge page: busy"))
}

/// Why transfers on the disk holding `image` should bounce: it is a virtio
/// disk whose ring lacks indirect descriptors, and transparent huge pages
/// can be had. None when either is not so (or cannot be told).
pub fn segment_bound_disk(image: &File) -> Option<String> {
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    if thp.contains("[never]") {
        return None;
    }
    let meta = image.metadata().ok()?;
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    let sys = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(dev),
        libc::minor(dev)
    ));
    segment_bound(&sys.canonicalize().ok()?, 0).then(|| {
        format!(
            "{} is (or lies on) a virtio disk without indirect descriptors",
            sys.display()
        )
    })
}

/// Whether the block device at sysfs directory `dir` is a virtio disk
/// without indirect descriptors, or a partition of one, or lies on one
/// (device mapper, md: the devices under `slaves/`).
fn segment_bound(dir: &Path, depth: u32) -> bool {
    if let Some(f) = virtio_features(dir) {
        return lacks_indirect(&f);
    }
    if depth >= 4 {
        return false;
    }
    let Ok(slaves) = std::fs::read_dir(dir.join("slaves")) else {
        return false;
    };
    slaves.flatten().any(|e| {
        e.path()
            .canonicalize()
            .is_ok_and(|p| segment_bound(&p, depth + 1))
    })
}

/// Whether a sysfs virtio feature string (one digit per bit, bit 0 first)
/// lacks VIRTIO_RING_F_INDIRECT_DESC (bit 28).
fn lacks_indirect(features: &str) -> bool {
    features.as_bytes().get(28) == Some(&b'0')
}

/// The feature string of the virtio device above a block device's sysfs
/// directory (a partition's disk's), if it is one.
fn virtio_features(mut dir: &Path) -> Option<String> {
    loop {
        let name = dir.file_name()?.to_string_lossy();
        if name.starts_with("virtio") {
            if let Ok(f) = std::fs::read_to_string(dir.join("features")) {
                return Some(f.trim().to_string());
            }
        }
        dir = dir.parent()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_runs_of_granules_in_one_page() {
        let mut p = Pool::any_pages(2);
        let a = p.take(1 << 20).unwrap(); // 16 granules
        let b = p.take(GRANULE + 1).unwrap(); // 2
        assert_eq!(p.pages(), 1);
        assert_eq!(p.in_use(), 18);
        let c = p.take(PAGE_BYTES).unwrap(); // a whole page: a second one
        assert_eq!(p.pages(), 2);
        assert!(p.take(PAGE_BYTES).is_none(), "no third page");
        assert!(p.take(PAGE_BYTES + 1).is_none(), "larger than a page");
        assert!(p.take(0).is_none());
        let d = p.take(14 * GRANULE).unwrap(); // the rest of page one
        assert!(p.take(1).is_none(), "full");
        // Slots never overlap.
        let ranges = [&a, &b, &c, &d].map(|s| (s.ptr.as_ptr() as usize, s.len));
        for (i, x) in ranges.iter().enumerate() {
            for y in &ranges[i + 1..] {
                assert!(x.0 + x.1 <= y.0 || y.0 + y.1 <= x.0, "{x:?} {y:?}");
            }
        }
        // Every slot is inside a 2 MiB-aligned page.
        for (ptr, len) in ranges {
            assert_eq!(ptr / PAGE_BYTES, (ptr + len - 1) / PAGE_BYTES);
        }
        p.give(b);
        assert_eq!(p.in_use(), 16 + 32 + 14);
        let e = p.take(2 * GRANULE).unwrap();
        assert_eq!(e.page, 0);
        p.give(a);
        p.give(c);
        p.give(d);
        p.give(e);
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn a_virtio_disk_without_indirect_descriptors_is_found_in_sysfs() {
        let t = tempfile::tempdir().unwrap();
        let virtio = t.path().join("devices/pci0000:00/0000:00:05.0/virtio1");
        let part = virtio.join("block/vda/vda1");
        std::fs::create_dir_all(&part).unwrap();
        // This machine's disk: SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY, MQ,
        // EVENT_IDX, VERSION_1; no INDIRECT_DESC.
        let mut bits = vec![b'0'; 64];
        for b in [2, 6, 9, 10, 13, 29, 32] {
            bits[b] = b'1';
        }
        let plain = String::from_utf8(bits.clone()).unwrap();
        std::fs::write(virtio.join("features"), format!("{plain}\n")).unwrap();
        let f = virtio_features(&part).unwrap();
        assert_eq!(f, plain);
        assert!(lacks_indirect(&f));
        bits[28] = b'1';
        assert!(!lacks_indirect(std::str::from_utf8(&bits).unwrap()));
        assert!(!lacks_indirect(""), "too short to tell: no");
        // Not under a virtio device (an NVMe disk, a loop device).
        let nvme = t
            .path()
            .join("devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1");
        std::fs::create_dir_all(&nvme).unwrap();
        assert!(virtio_features(&nvme).is_none());
        assert!(segment_bound(&part, 0));
        assert!(!segment_bound(&nvme, 0));
        // A device-mapper volume on the partition (LVM, dm-crypt) is found
        // through its slaves; one on the NVMe disk is not.
        let dm = t.path().join("devices/virtual/block/dm-0");
        std::fs::create_dir_all(dm.join("slaves")).unwrap();
        std::os::unix::fs::symlink(&nvme, dm.join("slaves/nvme0n1")).unwrap();
        assert!(!segment_bound(&dm, 0));
        std::os::unix::fs::symlink(&part, dm.join("slaves/vda1")).unwrap();
        assert!(segment_bound(&dm, 0));
    }

    #[test]
    fn copies_go_across_scattered_buffers() {
        let mut p = Pool::any_pages(1);
        let mut s = p.take(10_000).unwrap();
        let mut x = vec![1u8; 3000];
        let mut y = vec![2u8; 7000];
        for (i, b) in x.iter_mut().chain(y.iter_mut()).enumerate() {
            *b = (i % 251) as u8;
        }
        let iov = |x: &mut Vec<u8>, y: &mut Vec<u8>| {
            IoVecs(vec![
                libc::iovec {
                    iov_base: x.as_mut_ptr().cast(),
                    iov_len: x.len(),
                },
                libc::iovec {
                    iov_base: y.as_mut_ptr().cast(),
                    iov_len: y.len(),
                },
            ])
        };
        assert_eq!(s.copy_in(&iov(&mut x, &mut y)), 10_000);
        let mut x2 = vec![0u8; 3000];
        let mut y2 = vec![0u8; 7000];
        // Only what was transferred is copied out.
        s.copy_out(&iov(&mut x2, &mut y2), 5000);
        assert_eq!(x2, x);
        assert_eq!(y2[..2000], y[..2000]);
        assert!(y2[2000..].iter().all(|&b| b == 0));
        p.give(s);
    }

    /// The page is 2 MiB-aligned, advised for a transparent huge page, and
    /// is one.
    #[test]
    fn pages_are_aligned_and_huge() {
        let mut p = Pool::new(1);
        let Some(s) = p.take(PAGE_BYTES) else {
            backend_common::skip_or_fail("no huge page to be had on this host now");
            return;
        };
        let addr = s.ptr.as_ptr() as usize;
        assert_eq!(addr % PAGE_BYTES, 0);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_ours = false;
        let (mut flags, mut huge) = (None, None);
        for line in smaps.lines() {
            let range = line.split_once(' ').and_then(|(r, _)| r.split_once('-'));
            if let Some((a, b)) = range {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    in_ours = a <= addr && addr < b;
                    continue;
                }
            }
            if in_ours {
                if let Some(v) = line.strip_prefix("AnonHugePages:") {
                    huge = Some(v.trim().to_string());
                }
                if let Some(v) = line.strip_prefix("VmFlags:") {
                    flags = Some(v.split_whitespace().map(str::to_string).collect::<Vec<_>>());
                }
            }
        }
        let flags = flags.expect("the page's mapping is in smaps");
        assert!(flags.iter().any(|f| f == "hg"), "MADV_HUGEPAGE: {flags:?}");
        // A page the pool hands out is one huge page where the kernel has
        // MADV_COLLAPSE (6.1+) to make sure of it.
        let huge_kib: u64 = huge
            .as_deref()
            .and_then(|h| h.trim_end_matches(" kB").parse().ok())
            .unwrap_or(0);
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = release
            .trim()
            .split(['.', '-'])
            .map(|x| x.parse::<u32>().unwrap_or(0));
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        if (major, minor) >= (6, 1) {
            assert!(
                huge_kib >= 2048,
                "AnonHugePages {huge:?} on Linux {release}"
            );
        } else {
            println!("bounce page: AnonHugePages {huge:?} (no MADV_COLLAPSE before 6.1)");
        }
        p.give(s);
    }
}
