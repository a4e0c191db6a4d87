//! Checks on the busybox binary that becomes the guest's whole userland.

use std::io;
use std::path::Path;
use std::process::Command;

use super::{ImageError, Result};

/// Checks that `elf` is a 64-bit little-endian x86-64 executable without a PT_INTERP segment,
/// i.e. one that runs without a dynamic loader or libc.
pub(super) fn check_static_elf(elf: &[u8]) -> std::result::Result<(), &'static str> {
    const PT_INTERP: u32 = 3;
    const EM_X86_64: u16 = 62;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file");
    }
    if elf.get(4..6) != Some(&[2, 1]) {
        return Err("not a 64-bit little-endian ELF");
    }
    if u16_at(0x12) != Some(EM_X86_64) {
        return Err("not built for x86-64");
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Err("truncated ELF header");
    };
    let phoff = usize::try_from(phoff).map_err(|_| "bad program header offset")?;
    for i in 0..usize::from(phnum) {
        let at = phoff
            .checked_add(i * usize::from(phentsize))
            .ok_or("bad program header offset")?;
        match u32_at(at) {
            Some(PT_INTERP) => return Err("dynamically linked: it has a PT_INTERP segment"),
            Some(_) => {}
            None => return Err("truncated program headers"),
        }
    }
    Ok(())
}

pub(super) fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let list_err = |source| ImageError::BusyboxList {
        path: busybox.to_owned(),
        source,
    };
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(list_err)?;
    if !out.status.success() {
        return Err(list_err(io::Error::other(format!(
            "exited with {}",
            out.status
        ))));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .map(str::trim)
        // Applet names become paths in the archive: keep them to plain names.
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox" && *a != "." && *a != "..")
        .map(str::to_owned)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_elf_check() {
        let mut elf = vec![0u8; 0x40 + 56 * 2];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x12] = 62;
        elf[0x20] = 0x40;
        elf[0x36] = 56;
        elf[0x38] = 2;
        elf[0x40] = 1; // PT_LOAD
        assert_eq!(check_static_elf(&elf), Ok(()));
        elf[0x40 + 56] = 3; // PT_INTERP
        assert!(check_static_elf(&elf).is_err());
        assert!(check_static_elf(b"#!/bin/sh").is_err());
        elf[0x38] = 200; // program headers past the end
        elf[0x40 + 56] = 1;
        assert!(check_static_elf(&elf).is_err());
    }
}
