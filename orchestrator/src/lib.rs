//! Starts, wires and supervises the device processes and the VMM from one config file.
//!
//! - [`image`]: the default guest image (host kernel, modules, busybox).
//! - [`qemu`]: QEMU as the compatibility VMM; [`qmp`]: asking it how the VM is.

pub mod config;
pub mod control;
pub mod image;
pub mod qemu;
pub mod qmp;
pub mod relay;
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

/// For a child between fork and exec: unblock every signal. The
/// orchestrator blocks SIGINT and SIGTERM in all its threads (one thread
/// waits for them), and a child inherits that mask, so a backend or QEMU
/// would never see the SIGTERM that asks it to stop. Async-signal-safe.
pub fn unblock_signals_in_child() -> std::io::Result<()> {
    // SAFETY: a zeroed sigset_t is valid for sigemptyset to initialize;
    // sigprocmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether process `pid` runs: it exists and is not a zombie waiting for
/// whoever adopted it to reap it.
/// 2 MiB huge pages the host has free now (/proc/meminfo; 0 if unknown).
pub fn free_huge_pages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("HugePages_Free:")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

pub fn process_runs(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty()
        && !stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
}
