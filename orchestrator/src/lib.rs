//! Starts, wires and supervises the device processes and the VMM from one config file.
//!
//! - [`image`]: the default guest image (host kernel, modules, busybox).
//! - [`qemu`]: QEMU as the compatibility VMM.

pub mod config;
pub mod control;
pub mod image;
pub mod qemu;
pub mod state;
pub mod supervisor;
pub mod units;
pub mod vm;

use std::path::PathBuf;

/// Find a program on PATH or in cargo's install dir.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}
