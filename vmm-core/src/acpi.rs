//! ACPI tables, built by hand: RSDP, XSDT, FADT (hardware-reduced), MADT
//! (one local APIC per vCPU, the IOAPIC, the PIT's interrupt override)
//! and a DSDT holding each virtio-mmio device (`LNRO0005`, its window and
//! interrupt). A stock distribution kernel needs them: Debian's has no MP
//! tables and no `virtio_mmio.device=` parameter.
//!
//! They live in the BIOS area at [`RSDP_ADDR`] (outside the e820 RAM
//! ranges, and where a kernel scanning for the RSDP looks); boot_params
//! also points at the RSDP.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::machine::MmioSlot;

/// The RSDP, at the start of the BIOS area the kernel scans.
pub const RSDP_ADDR: u64 = 0xe0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const LAPIC_ADDR: u32 = 0xfee0_0000;

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// A system description table header; length and checksum are filled by
/// [`finish`].
fn header(sig: &[u8; 4], revision: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(256);
    t.extend_from_slice(sig);
    t.extend_from_slice(&[0; 4]); // length
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(b"VMMCOR"); // OEM ID
    t.extend_from_slice(b"VMMCORE "); // OEM table ID
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"VMMC"); // creator ID
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t
}

fn finish(mut t: Vec<u8>) -> Vec<u8> {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = 0;
    t[9] = checksum(&t);
    t
}

/// AML PkgLength for a package whose body (after the PkgLength) is `body`
/// bytes long.
fn pkg_length(body: usize) -> Vec<u8> {
    let one = body + 1;
    if one <= 63 {
        return vec![one as u8];
    }
    let two = body + 2;
    assert!(two < 1 << 12, "AML package too large");
    vec![0x40 | (two & 0xf) as u8, (two >> 4) as u8]
}

/// `Name(NAME, data)`.
fn aml_name(name: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    v.extend_from_slice(name);
    v.extend_from_slice(data);
    v
}

/// A virtio-mmio device for the DSDT.
fn aml_virtio_device(index: usize, slot: MmioSlot) -> Vec<u8> {
    let mut crs = Vec::new();
    // Memory32Fixed(ReadWrite, base, 4 KiB)
    crs.extend_from_slice(&[0x86, 0x09, 0x00, 0x01]);
    crs.extend_from_slice(&(slot.base as u32).to_le_bytes());
    crs.extend_from_slice(&0x1000u32.to_le_bytes());
    // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) { irq }
    crs.extend_from_slice(&[0x89, 0x06, 0x00, 0x03, 0x01]);
    crs.extend_from_slice(&slot.irq.to_le_bytes());
    // End tag.
    crs.extend_from_slice(&[0x79, 0x00]);
    let mut buffer = vec![0x0a, crs.len() as u8]; // BufferSize
    buffer.extend_from_slice(&crs);
    let mut buf_op = vec![0x11];
    buf_op.extend(pkg_length(buffer.len()));
    buf_op.extend(buffer);

    let mut body = Vec::new();
    body.extend_from_slice(format!("VR{index:02X}").as_bytes());
    body.extend(aml_name(b"_HID", b"\x0dLNRO0005\x00"));
    body.extend(aml_name(b"_UID", &[0x0a, index as u8]));
    body.extend(aml_name(b"_CRS", &buf_op));
    let mut dev = vec![0x5b, 0x82];
    dev.extend(pkg_length(body.len()));
    dev.extend(body);
    dev
}

/// COM1 for the DSDT (`PNP0501`: its ports and interrupt). Hardware-reduced
/// ACPI leaves the kernel no legacy PIC, so no ISA interrupt is routed by
/// default: without this the UART's interrupt is never set up, and a
/// program writing to the console waits for a transmit interrupt forever
/// (only the kernel's own polled printk came out).
fn aml_com1(port: u16, irq: u32) -> Vec<u8> {
    let mut crs = Vec::new();
    // IO(Decode16, port, port, 0, 8)
    crs.push(0x47);
    crs.push(0x01);
    crs.extend_from_slice(&port.to_le_bytes());
    crs.extend_from_slice(&port.to_le_bytes());
    crs.extend_from_slice(&[0x00, 0x08]);
    // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) { irq }
    crs.extend_from_slice(&[0x89, 0x06, 0x00, 0x03, 0x01]);
    crs.extend_from_slice(&irq.to_le_bytes());
    crs.extend_from_slice(&[0x79, 0x00]);
    let mut buffer = vec![0x0a, crs.len() as u8];
    buffer.extend_from_slice(&crs);
    let mut buf_op = vec![0x11];
    buf_op.extend(pkg_length(buffer.len()));
    buf_op.extend(buffer);
    let mut body = b"COM1".to_vec();
    // _HID: EisaId("PNP0501"), a 16550A.
    body.extend(aml_name(b"_HID", &[0x0c, 0x41, 0xd0, 0x05, 0x01]));
    body.extend(aml_name(b"_UID", &[0x00]));
    body.extend(aml_name(b"_CRS", &buf_op));
    let mut dev = vec![0x5b, 0x82];
    dev.extend(pkg_length(body.len()));
    dev.extend(body);
    dev
}

/// The port of vmm-core's ACPI power device (hardware-reduced ACPI): the
/// FADT names it as both the sleep control and the reset register.
pub const POWER_PORT: u16 = 0x600;
/// What the guest writes there to power off: SLP_TYP 5 (from `_S5_`) in
/// bits 2-4, SLP_EN (bit 5).
pub const POWER_OFF: u8 = (5 << 2) | (1 << 5);
/// What it writes there to reset (the FADT's RESET_VALUE).
pub const RESET: u8 = 1;

/// A Generic Address Structure for a byte-wide I/O port.
fn gas_io(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // SystemIO
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn dsdt(devices: &[MmioSlot]) -> Vec<u8> {
    let mut t = header(b"DSDT", 2);
    // Name(_S5_, Package() { 5, 0 }): the sleep type for soft-off.
    let s5_body = [0x02, 0x0a, 0x05, 0x00];
    let mut s5 = vec![0x12];
    s5.extend(pkg_length(s5_body.len()));
    s5.extend_from_slice(&s5_body);
    t.extend(aml_name(b"_S5_", &s5));
    let mut scope_body = b"\\_SB_".to_vec();
    scope_body.extend(aml_com1(crate::machine::COM1, crate::machine::COM1_IRQ));
    for (i, s) in devices.iter().enumerate() {
        scope_body.extend(aml_virtio_device(i, *s));
    }
    t.push(0x10); // ScopeOp
    t.extend(pkg_length(scope_body.len()));
    t.extend(scope_body);
    finish(t)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut t = header(b"FACP", 6);
    t.resize(276, 0);
    t[40..44].copy_from_slice(&(dsdt_addr as u32).to_le_bytes());
    // IAPC_BOOT_ARCH: no VGA, no MSI, no ASPM control, no CMOS RTC (the
    // guest takes the time from kvmclock; a kernel probing for an RTC that
    // is not there spun for seconds in the nested bed waiting for its
    // update-in-progress bit to clear). The 8042 bit stays clear: no
    // keyboard controller is probed either.
    t[109..111].copy_from_slice(&((1u16 << 2) | (1 << 3) | (1 << 4) | (1 << 5)).to_le_bytes());
    // Flags: RESET_REG_SUP, HW_REDUCED_ACPI.
    t[112..116].copy_from_slice(&((1u32 << 10) | (1 << 20)).to_le_bytes());
    // RESET_REG and RESET_VALUE; SLEEP_CONTROL_REG and SLEEP_STATUS_REG.
    t[116..128].copy_from_slice(&gas_io(POWER_PORT));
    t[128] = RESET;
    t[244..256].copy_from_slice(&gas_io(POWER_PORT));
    t[256..268].copy_from_slice(&gas_io(POWER_PORT));
    t[131] = 5; // FADT minor version
    t[140..148].copy_from_slice(&dsdt_addr.to_le_bytes()); // X_DSDT
    t[268..276].copy_from_slice(b"VMMCORE\0"); // hypervisor vendor
    finish(t)
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut t = header(b"APIC", 5);
    t.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259s
    for i in 0..cpus {
        t.extend_from_slice(&[0, 8, i, i]);
        t.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    t.extend_from_slice(&[1, 12, 0, 0]); // IOAPIC 0
    t.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes()); // GSI base
                                              // The PIT's IRQ 0 arrives on GSI 2 (as KVM's in-kernel IOAPIC routes it).
    t.extend_from_slice(&[2, 10, 0, 0]);
    t.extend_from_slice(&2u32.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes());
    finish(t)
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(b"VMMCOR");
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // RSDT address: none
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]); // extended checksum, reserved
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

fn align(x: u64) -> u64 {
    (x + 15) & !15
}

/// Write every table for `cpus` vCPUs and `devices`; returns the RSDP's
/// address.
pub fn write_tables(mem: &GuestMemoryMmap, cpus: u8, devices: &[MmioSlot]) -> Result<u64, String> {
    let put = |at: u64, t: &[u8]| {
        mem.write_slice(t, GuestAddress(at))
            .map_err(|e| format!("writing ACPI tables at {at:#x}: {e}"))
    };
    let dsdt_t = dsdt(devices);
    let dsdt_addr = align(RSDP_ADDR + 36);
    let fadt_addr = align(dsdt_addr + dsdt_t.len() as u64);
    let fadt_t = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt_t.len() as u64);
    let madt_t = madt(cpus);
    let xsdt_addr = align(madt_addr + madt_t.len() as u64);
    let mut xsdt_t = header(b"XSDT", 1);
    for a in [fadt_addr, madt_addr] {
        xsdt_t.extend_from_slice(&a.to_le_bytes());
    }
    let xsdt_t = finish(xsdt_t);
    if xsdt_addr + xsdt_t.len() as u64 > 0x10_0000 {
        return Err("the ACPI tables outgrow the BIOS area".into());
    }
    put(dsdt_addr, &dsdt_t)?;
    put(fadt_addr, &fadt_t)?;
    put(madt_addr, &madt_t)?;
    put(xsdt_addr, &xsdt_t)?;
    put(RSDP_ADDR, &rsdp(xsdt_addr))?;
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_sum_to_zero_and_say_their_length() {
        let slots = [MmioSlot {
            base: 0xd000_0000,
            irq: 5,
        }];
        for t in [dsdt(&slots), fadt(0x1000), madt(4)] {
            assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
        }
        assert_eq!(fadt(0).len(), 276);
        // Four local APICs, an IOAPIC and an override after the 44 bytes.
        assert_eq!(madt(4).len(), 44 + 4 * 8 + 12 + 10);
        let r = rsdp(0xe0100);
        assert_eq!(r.len(), 36);
        assert_eq!(r[..20].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        assert_eq!(r.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
    }

    #[test]
    fn the_dsdt_names_each_virtio_device_with_its_window_and_interrupt() {
        let slots = [
            MmioSlot {
                base: 0xd000_0000,
                irq: 5,
            },
            MmioSlot {
                base: 0xd000_1000,
                irq: 6,
            },
        ];
        let d = dsdt(&slots);
        let find = |needle: &[u8]| d.windows(needle.len()).position(|w| w == needle);
        assert!(find(b"\\_SB_").is_some());
        assert!(find(b"VR00").is_some() && find(b"VR01").is_some());
        assert_eq!(d.windows(8).filter(|w| w == b"LNRO0005").count(), 2);
        assert!(find(&0xd000_1000u32.to_le_bytes()).is_some());
        assert!(find(&[0x89, 0x06, 0x00, 0x03, 0x01, 6, 0, 0, 0]).is_some());
    }

    #[test]
    fn power_off_and_reset_go_to_the_power_port() {
        let f = fadt(0x1000);
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        for at in [116, 244, 256] {
            assert_eq!(f[at], 1, "SystemIO at {at}");
            assert_eq!(
                u64::from_le_bytes(f[at + 4..at + 12].try_into().unwrap()),
                u64::from(POWER_PORT)
            );
        }
        assert_eq!(f[128], RESET);
        // Name(_S5_, Package(2) { 5, 0 }), which Linux reads for SLP_TYP.
        let d = dsdt(&[]);
        let s5 = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00,
        ];
        assert!(d.windows(s5.len()).any(|w| w == s5));
        assert_eq!(POWER_OFF, 0x34);
    }

    #[test]
    fn long_packages_take_two_length_bytes() {
        assert_eq!(pkg_length(10), vec![11]);
        assert_eq!(pkg_length(62), vec![63]);
        let p = pkg_length(100);
        assert_eq!(p.len(), 2);
        assert_eq!((usize::from(p[1]) << 4) | usize::from(p[0] & 0xf), 102);
    }
}
