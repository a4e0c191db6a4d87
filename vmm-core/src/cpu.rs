//! x86-64 vCPU state for the two ways a guest starts here: real mode at an
//! address (small test programs), and 64-bit long mode with identity page
//! tables (Linux's 64-bit entry, and long-mode test programs). The layout
//! of the low pages follows the boot protocol's conventions.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, CpuId};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The GDT and an empty IDT.
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
/// Identity page tables: PML4, one PDPT, four PDs of 2 MiB pages: the
/// first 4 GiB, so the MMIO hole is reachable too.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
const PD_COUNT: u64 = 4;
/// The initial stack of a 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("writing the boot page tables into guest memory: {0}")]
    Memory(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

/// A GDT entry from flags, base and limit (the layout of the SDM, 3.4.5).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The kvm_segment a GDT entry at `index` describes.
fn segment(entry: u64, index: u8) -> kvm_segment {
    let flags = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32,
        selector: u16::from(index) * 8,
        type_: flags(40, 0xf),
        present: flags(47, 1),
        dpl: flags(45, 3),
        db: flags(54, 1),
        s: flags(44, 1),
        l: flags(53, 1),
        g: flags(55, 1),
        avl: flags(52, 1),
        unusable: if flags(47, 1) == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// Real mode at `entry` (CS base 0), as after a reset but elsewhere.
pub fn setup_real_mode(vcpu: &VcpuFd, entry: u16) -> Result<(), CpuError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: u64::from(entry),
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// 64-bit long mode at `entry` with the first 4 GiB identity-mapped, flat
/// segments, and `rsi` (the boot_params address for Linux).
pub fn setup_long_mode(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: u64,
    rsi: u64,
) -> Result<(), CpuError> {
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|e| CpuError::Memory(e.to_string()))
    };
    for (i, e) in gdt.iter().enumerate() {
        w(*e, GDT_ADDR + 8 * i as u64)?;
    }
    w(0, IDT_ADDR)?;
    w(PDPT_ADDR | 0x03, PML4_ADDR)?;
    for d in 0..PD_COUNT {
        w((PD_ADDR + 0x1000 * d) | 0x03, PDPT_ADDR + 8 * d)?;
    }
    for i in 0..512 * PD_COUNT {
        w((i << 21) | 0x83, PD_ADDR + 8 * i)?;
    }
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (8 * gdt.len() - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    let regs = kvm_regs {
        rflags: 2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// KVM's supported CPUID with this VMM's adjustments for vCPU `index` of
/// `count`: the hypervisor bit, the initial APIC ID, and the logical
/// processor count.
pub fn cpuid_for(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ecx |= 1 << 31; // running under a hypervisor
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count above is valid
                }
            }
            0xb | 0x1f => {
                // x2APIC ID of this vCPU.
                e.edx = u32::from(index);
            }
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_into_segments() {
        let code = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(code, 0x00af_9b00_0000_ffff);
        let s = segment(code, 1);
        assert_eq!(
            (s.selector, s.l, s.present, s.type_, s.g),
            (8, 1, 1, 0xb, 1)
        );
        assert_eq!(s.limit, 0xfffff);
        let null = segment(gdt_entry(0, 0, 0), 0);
        assert_eq!(null.unusable, 1);
    }
}
