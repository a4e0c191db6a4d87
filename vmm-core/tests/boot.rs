//! vmm-core's Linux boot path and its errors, through the binary.
//!
//! Debian's kernel, extracted from its bzImage as an ELF vmlinux, loaded
//! and entered at its 64-bit entry with boot_params: the banner, the
//! command line, the e820 map, vmm-core's ACPI tables and the CPUs its MADT
//! lists appear on the emulated 8250. Where KVM is
//! software virtualization (PVM) the kernel runs under instruction
//! emulation, so the test stops at the early console. A full boot does not
//! get further there: KVM's emulator stops Debian's 6.1 kernel within two
//! minutes at an instruction it lacks (cmpxchg16b, xrstor, or the int3
//! self-test of the kernel's code patching), and vmm-core says so.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm-core");

fn skip(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{why} (CI is set, so this is a failure, not a skip)");
    }
    let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("skipped: {why}\n"));
}

/// The newest /boot/vmlinuz-*, its ELF kernel extracted (the payload of a
/// Debian bzImage is legacy-lz4 compressed).
fn vmlinux(dir: &Path) -> Option<PathBuf> {
    let img = std::fs::read(bzimage()?).ok()?;
    unpack(&img, dir)
}

/// The newest /boot/vmlinuz-* itself.
fn bzimage() -> Option<PathBuf> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    let Some(bz) = kernels.pop() else {
        skip("no /boot/vmlinuz-* (apt-get install linux-image-cloud-amd64)");
        return None;
    };
    Some(bz)
}

fn unpack(img: &[u8], dir: &Path) -> Option<PathBuf> {
    let setup_sects = usize::from(img[0x1f1].max(4));
    let u32_at = |o: usize| u32::from_le_bytes(img[o..o + 4].try_into().unwrap()) as usize;
    let (off, len) = (u32_at(0x248), u32_at(0x24c));
    let start = (setup_sects + 1) * 512 + off;
    let payload = &img[start..start + len];
    let lz4 = dir.join("payload.lz4");
    std::fs::write(&lz4, payload).unwrap();
    let out = dir.join("vmlinux");
    let st = Command::new("lz4")
        .args(["-dqf"])
        .arg(&lz4)
        .arg(&out)
        .status();
    match st {
        Ok(s) if s.success() || out.exists() => Some(out),
        _ => {
            skip("cannot unpack the kernel's lz4 payload (apt-get install lz4)");
            None
        }
    }
}

#[test]
fn debians_kernel_prints_its_banner_command_line_and_e820_map() {
    if !common::kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(kernel) = vmlinux(dir.path()) else {
        return;
    };
    assert_eq!(&std::fs::read(&kernel).unwrap()[..4], b"\x7fELF");
    boots_to_its_early_console(dir.path(), &kernel, &[]);
}

/// The same in guest memory of 2 MiB huge pages (`--hugepages`), where
/// the host has them reserved. (The bzImage itself, entered at its 64-bit
/// entry, prints nothing under PVM: its decompressor stops before the
/// console, with or without huge pages.)
#[test]
fn debians_kernel_boots_in_huge_pages_too() {
    if !common::kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(kernel) = vmlinux(dir.path()) else {
        return;
    };
    let free = vmm_core::memory::free_huge_pages();
    let huge: &[&str] = if free >= 128 {
        &["--hugepages"]
    } else {
        backend_common::skip_or_fail(&format!(
            "huge pages: {free} of the 128 needed are free \
             (sysctl vm.nr_hugepages=128); booting in normal pages"
        ));
        &[]
    };
    boots_to_its_early_console(dir.path(), &kernel, huge);
}

fn boots_to_its_early_console(dir: &Path, kernel: &Path, extra: &[&str]) {
    let log = dir.join("console");
    let mut child = Command::new(VMM)
        .arg("--kernel")
        .arg(kernel)
        .args(extra)
        .args(["--memory", "256M", "--cpus", "2", "--cmdline"])
        .arg("console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1 vmmcore.test=42")
        .arg(format!("--serial=file:{}", log.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let want = [
        "Linux version ",
        "Command line: console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1 vmmcore.test=42",
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        // vmm-core's ACPI tables, found through boot_params.
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 VMMCOR)",
        "ACPI: XSDT",
        "ACPI: FACP",
        "ACPI: DSDT",
        "ACPI: APIC",
        // The MADT: both vCPUs, and the PIT's interrupt override.
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
    ];
    let deadline = Instant::now() + Duration::from_secs(120);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if want.iter().all(|w| text.contains(w)) {
            break text;
        }
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("vmm-core exited ({st}) early:\n{err}\n--- console ---\n{text}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("not all of {want:?} within 120 s:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    // The map is the one vmm-core wrote: nothing but RAM, no firmware.
    assert_eq!(text.matches("BIOS-e820").count(), 2, "{text}");
}

fn fails_with(args: &[&str], what: &str) {
    let out = Command::new(VMM).args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(what), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_kernels_memory_and_devices_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
    let junk = junk.to_str().unwrap();
    fails_with(
        &["--kernel", "/nonexistent/vmlinux"],
        "/nonexistent/vmlinux",
    );
    if std::fs::metadata("/dev/kvm").is_ok() {
        fails_with(&["--kernel", junk], "is not a kernel vmm-core can boot");
        fails_with(
            &["--kernel", junk, "--initramfs", "/nonexistent/initrd"],
            "is not a kernel",
        );
    }
    fails_with(&["--kernel", junk, "--memory", "4M"], "at least 16 MiB");
    // More huge pages than any test host reserves: refused before anything
    // touches the memory.
    fails_with(
        &["--kernel", junk, "--memory", "512G", "--hugepages"],
        "huge pages",
    );
    fails_with(
        &["--kernel", junk, "--memory", "lots"],
        "use a K, M or G suffix",
    );
    fails_with(&["--kernel", junk, "--memory", "x5M"], "not a size");
    fails_with(
        &["--kernel", junk, "--serial", "tcp:1"],
        "stdio, file:PATH, socket:PATH or off",
    );
    if std::fs::metadata("/dev/kvm").is_ok() {
        fails_with(
            &["--kernel", junk, "--blk", "socket=/nonexistent/b.sock"],
            "/nonexistent/b.sock",
        );
    }
    fails_with(&["--kernel", junk, "--blk", "path=/x"], "socket=PATH");
    fails_with(
        &["--kernel", junk, "--api-socket", "/nonexistent/api.sock"],
        "control API socket /nonexistent/api.sock",
    );
}

/// Kernels that cannot run are refused before the VM starts, saying why,
/// instead of loading and triple-faulting: another architecture's, a
/// truncated bzImage, one whose start needs more memory than the VM has.
#[test]
fn unbootable_kernels_are_refused_with_the_reason() {
    if !common::kvm() {
        return;
    }
    let Some(bz) = bzimage() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(&bz).unwrap();
    let cut = dir.path().join("cut");
    std::fs::write(&cut, &full[..full.len() / 3]).unwrap();
    fails_with(&["--kernel", cut.to_str().unwrap()], "is cut short");
    // An AArch64 ELF header, and an arm64 Image's magic.
    let mut elf = vec![0u8; 4096];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[16..20].copy_from_slice(&[2, 0, 183, 0]);
    let arm_elf = dir.path().join("arm.elf");
    std::fs::write(&arm_elf, &elf).unwrap();
    fails_with(&["--kernel", arm_elf.to_str().unwrap()], "AArch64");
    let mut image = vec![0u8; 4096];
    image[0x38..0x3c].copy_from_slice(b"ARM\x64");
    let arm_image = dir.path().join("Image");
    std::fs::write(&arm_image, &image).unwrap();
    fails_with(
        &["--kernel", arm_image.to_str().unwrap()],
        "arm64 kernel Image",
    );
    // Debian's kernel needs about 50 MiB from where it loads.
    fails_with(
        &["--kernel", bz.to_str().unwrap(), "--memory", "20M"],
        "give it more with --memory",
    );
}
