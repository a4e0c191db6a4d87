//! Small guest programs under KVM, set up by vmm-core: real mode and long
//! mode entry, port I/O to the UART, the i8042 reset and the debug-exit
//! port. KVM here may be software virtualization (PVM); these run at full
//! speed either way.

mod common;

use vmm_core::cpu;
use vmm_core::machine::{load_program, Machine, Stop};
use vmm_core::memory::GuestRam;

use common::Console;

fn machine() -> Option<(Machine, Console)> {
    if !common::kvm() {
        return None;
    }
    let console = Console::default();
    let m = Machine::new(
        GuestRam::new(32 << 20).unwrap(),
        1,
        Box::new(console.clone()),
    )
    .expect("a VM");
    Some((m, console))
}

/// `mov dx, port; mov al, byte; out dx, al` (16-bit operand size in real
/// mode; in long mode the caller prefixes 0x66 to the `mov dx`).
fn out(port: u16, byte: u8, long: bool) -> Vec<u8> {
    let mut v = Vec::new();
    if long {
        v.push(0x66);
    }
    v.push(0xba);
    v.extend_from_slice(&port.to_le_bytes());
    v.extend_from_slice(&[0xb0, byte, 0xee]);
    v
}

#[test]
fn a_real_mode_program_prints_and_exits_with_its_code() {
    let Some((m, console)) = machine() else {
        return;
    };
    let mut code = Vec::new();
    for b in b"real\n" {
        code.extend(out(0x3f8, *b, false));
    }
    code.extend(out(0x501, 42, false));
    code.push(0xf4); // hlt: not reached
    load_program(m.ram(), 0x1000, &code).unwrap();
    cpu::setup_real_mode(m.boot_vcpu(), 0x1000).unwrap();
    assert_eq!(m.run(), Stop::DebugExit(42));
    assert_eq!(console.text(), "real\n");
}

#[test]
fn a_long_mode_program_runs_above_one_mib_with_paging() {
    let Some((m, console)) = machine() else {
        return;
    };
    let mut code = Vec::new();
    // mov rax, [0x200000]: read through the identity map, then print it.
    code.extend_from_slice(&[0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00]);
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend_from_slice(&[0xee]); // out dx, al (the byte read)
    code.extend(out(0x3f8, b'\n', true));
    code.extend(out(0x501, 7, true));
    load_program(m.ram(), 0x10_0000, &code).unwrap();
    load_program(m.ram(), 0x20_0000, b"L").unwrap();
    m.start_long_mode(0x10_0000, 0).unwrap();
    assert_eq!(m.run(), Stop::DebugExit(7));
    assert_eq!(console.text(), "L\n");
}

#[test]
fn the_i8042_reset_line_ends_the_vm() {
    let Some((m, _)) = machine() else {
        return;
    };
    // mov al, 0xfe; out 0x64, al
    load_program(m.ram(), 0x1000, &[0xb0, 0xfe, 0xe6, 0x64, 0xf4]).unwrap();
    cpu::setup_real_mode(m.boot_vcpu(), 0x1000).unwrap();
    assert_eq!(m.run(), Stop::Reset);
}

#[test]
fn acpi_power_off_and_reset_end_the_vm_each_their_way() {
    use vmm_core::acpi::{POWER_OFF, POWER_PORT, RESET};
    for (value, want) in [(POWER_OFF, Stop::PowerOff), (RESET, Stop::Reset)] {
        let Some((m, _)) = machine() else {
            return;
        };
        // mov dx, POWER_PORT; mov al, value; out dx, al; hlt
        let mut code = out(POWER_PORT, value, false);
        code.push(0xf4);
        load_program(m.ram(), 0x1000, &code).unwrap();
        cpu::setup_real_mode(m.boot_vcpu(), 0x1000).unwrap();
        assert_eq!(m.run(), want, "wrote {value:#x}");
    }
}
