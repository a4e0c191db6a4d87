//! Direct Linux boot: an ELF `vmlinux` (entered at its 64-bit entry) or a
//! bzImage (entered at its 64-bit entry, 0x200 past where it loads), with
//! the command line, an initramfs and the e820 map in boot_params (the
//! "zero page"), per the kernel's Documentation/x86/boot.rst.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::memory::GuestRam;

/// boot_params.
pub const ZERO_PAGE: u64 = 0x7000;
/// The command line, NUL-terminated.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Where the kernel may be loaded from (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// The top of conventional memory below the EBDA.
pub const EBDA_START: u64 = 0x9_fc00;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// The highest initramfs address a kernel takes when it does not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("opening {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a kernel vmm-core can boot: not an ELF vmlinux ({elf}) and not a bzImage ({bz})")]
    NotAKernel {
        path: PathBuf,
        elf: String,
        bz: String,
    },
    #[error("the command line is {0} bytes; at most {CMDLINE_MAX} fit")]
    Cmdline(usize),
    #[error("the initramfs ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel; give the VM more memory")]
    InitramfsTooBig { size: u64, limit: u64 },
    #[error("writing {0} into guest memory")]
    Memory(&'static str),
    #[error("{path} is {what}: vmm-core boots x86-64 kernels")]
    NotX86 { path: PathBuf, what: String },
    #[error(
        "{path} is cut short: a bzImage of this header needs {need} bytes, the file has {have}"
    )]
    Truncated { path: PathBuf, have: u64, need: u64 },
    #[error("{path} needs {need_mib} MiB of memory to start (its init_size, from where it loads), and the VM has {have_mib} MiB below 4 GiB; give it more with --memory")]
    TooLittleMemory {
        path: PathBuf,
        need_mib: u64,
        have_mib: u64,
    },
}

/// What the start of a kernel file says it is, before anything is loaded:
/// another architecture's kernel, a truncated bzImage, or one that cannot
/// start in `low_end` bytes of memory is a clear error here rather than a
/// triple fault later.
fn precheck(path: &Path, f: &mut File, low_end: u64) -> Result<(), BootError> {
    use std::io::{Seek, SeekFrom};
    let mut head = vec![0u8; 0x270];
    let n = {
        let mut got = 0;
        while got < head.len() {
            match f.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(source) => {
                    return Err(BootError::Open {
                        what: "the kernel",
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
        got
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    f.seek(SeekFrom::Start(0))
        .map_err(|source| BootError::Open {
            what: "the kernel",
            path: path.to_path_buf(),
            source,
        })?;
    let head = &head[..n];
    let u16_at = |o: usize| head.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        head.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let not_x86 = |what: String| BootError::NotX86 {
        path: path.to_path_buf(),
        what,
    };
    if head.starts_with(b"\x7fELF") {
        return match (head.get(4), u16_at(18)) {
            (Some(2), Some(62)) => Ok(()),
            (Some(1), _) => Err(not_x86("a 32-bit ELF".into())),
            (_, Some(machine)) => Err(not_x86(format!(
                "an ELF for machine {machine} ({})",
                match machine {
                    3 => "i386",
                    40 => "ARM",
                    183 => "AArch64",
                    243 => "RISC-V",
                    _ => "not x86-64",
                }
            ))),
            _ => Err(not_x86("a truncated ELF".into())),
        };
    }
    if head.get(0x38..0x3c) == Some(b"ARM\x64") {
        return Err(not_x86("an arm64 kernel Image".into()));
    }
    if u32_at(0x202) == Some(KERNEL_HDR_MAGIC) {
        let setup_sects = match head[0x1f1] {
            0 => 4,
            n => u64::from(n),
        };
        let syssize = u64::from(u32_at(0x1f4).unwrap_or(0));
        let need = (setup_sects + 1) * 512 + syssize * 16;
        if len < need {
            return Err(BootError::Truncated {
                path: path.to_path_buf(),
                have: len,
                need,
            });
        }
        // Boot protocol 2.10+: the memory the kernel needs from where it
        // loads to start (decompression included).
        if u16_at(0x206).unwrap_or(0) >= 0x020a {
            let init_size = u64::from(u32_at(0x260).unwrap_or(0));
            let need = HIMEM_START + init_size;
            if need > low_end {
                return Err(BootError::TooLittleMemory {
                    path: path.to_path_buf(),
                    need_mib: need.div_ceil(1 << 20),
                    have_mib: low_end >> 20,
                });
            }
        }
    }
    Ok(())
}

/// Where to start the boot vCPU.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// 64-bit entry point.
    pub rip: u64,
    /// boot_params, handed over in RSI.
    pub rsi: u64,
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Load `kernel` (and `initramfs`) into `ram` with `cmdline`, pointing
/// the kernel at the ACPI tables' RSDP when there are tables.
pub fn load_linux(
    ram: &GuestRam,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    acpi_rsdp: Option<u64>,
) -> Result<Entry, BootError> {
    let images = load_images(&ram.mem, ram.low_end(), kernel, initramfs)?;
    finish_boot(ram, images, cmdline, acpi_rsdp)
}

/// A kernel (and initramfs) in guest memory, its boot_params still to be
/// completed by [`finish_boot`].
pub struct Images {
    rip: u64,
    params: boot_params,
}

/// The slow half of [`load_linux`], which needs nothing from the VM but
/// its memory: copying the kernel and the initramfs in. vmm-core runs it on
/// a thread of its own while it sets the VM and its devices up. `low_end`
/// is where RAM below the MMIO hole ends.
pub fn load_images(
    mem: &vm_memory::GuestMemoryMmap,
    low_end: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
) -> Result<Images, BootError> {
    let mut f = open("the kernel", kernel)?;
    precheck(kernel, &mut f, low_end)?;
    let elf = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)));
    let (loaded, rip, mut params) = match elf {
        Ok(r) => {
            let mut p = boot_params::default();
            p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            p.hdr.header = KERNEL_HDR_MAGIC;
            p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            (r.kernel_end, r.kernel_load.0, p)
        }
        Err(elf_err) => {
            let bz = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)));
            match bz {
                Ok(r) => {
                    let mut p = boot_params::default();
                    if let Some(h) = r.setup_header {
                        p.hdr = h;
                    }
                    (r.kernel_end, r.kernel_load.0 + 0x200, p)
                }
                Err(bz_err) => {
                    return Err(BootError::NotAKernel {
                        path: kernel.to_path_buf(),
                        elf: elf_err.to_string(),
                        bz: bz_err.to_string(),
                    })
                }
            }
        }
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;

    if let Some(path) = initramfs {
        let mut data = Vec::new();
        open("the initramfs", path)?
            .read_to_end(&mut data)
            .map_err(|source| BootError::Open {
                what: "the initramfs",
                path: path.to_path_buf(),
                source,
            })?;
        let max = match params.hdr.initrd_addr_max {
            0 => DEFAULT_INITRD_ADDR_MAX,
            m => u64::from(m),
        };
        let limit = low_end.min(max + 1);
        let size = data.len() as u64;
        let at = limit.saturating_sub(size) & !0xfff;
        if at < loaded.max(HIMEM_START) {
            return Err(BootError::InitramfsTooBig { size, limit });
        }
        mem.write_slice(&data, GuestAddress(at))
            .map_err(|_| BootError::Memory("the initramfs"))?;
        params.hdr.ramdisk_image = at as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    Ok(Images { rip, params })
}

/// The rest of the boot set-up once the images are in: the command line,
/// the RSDP's address, the e820 map and boot_params.
pub fn finish_boot(
    ram: &GuestRam,
    images: Images,
    cmdline: &str,
    acpi_rsdp: Option<u64>,
) -> Result<Entry, BootError> {
    let mem = &ram.mem;
    let Images { rip, mut params } = images;
    if let Some(rsdp) = acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }

    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::Cmdline(cmdline.len()));
    }
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|_| BootError::Cmdline(cmdline.len()))?;
    cl.insert_str(cmdline)
        .map_err(|_| BootError::Cmdline(cmdline.len()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|_| BootError::Memory("the command line"))?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    // The e820 map: conventional memory, then everything from 1 MiB.
    let mut e820 = vec![(0, EBDA_START)];
    for (i, &(addr, len)) in ram.regions.iter().enumerate() {
        if i == 0 {
            e820.push((HIMEM_START, addr + len - HIMEM_START));
        } else {
            e820.push((addr, len));
        }
    }
    for (i, &(addr, size)) in e820.iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].type_ = E820_RAM;
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<vm_memory::GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|_| BootError::Memory("boot_params"))?;
    debug_assert!(mem.address_in_range(GuestAddress(ZERO_PAGE)));
    Ok(Entry {
        rip,
        rsi: ZERO_PAGE,
    })
}
