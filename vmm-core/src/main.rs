//! vmm-core: boot a Linux kernel (or a raw program) under KVM. See the
//! library docs for what exists so far.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm_core::boot;
use vmm_core::machine::{Machine, Stop};
use vmm_core::memory::GuestRam;
use vmm_core::vhost_user::VhostUserDevice;

/// A thin KVM VMM whose virtio devices are vhost-user backend processes.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// The kernel: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// An initramfs (cpio, compressed or not).
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
    cmdline: String,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    cpus: u8,
    /// Guest memory: a number of MiB, or with a K, M or G suffix.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    memory: u64,
    /// Where the serial console goes: stdio, file:PATH or off.
    #[arg(long, default_value = "stdio", value_parser = parse_serial)]
    serial: Serial,
    /// A virtio-fs device served by a vhost-user backend:
    /// socket=PATH[,queues=N] (the tag is the backend's config space).
    #[arg(long, value_name = "SPEC", value_parser = parse_device)]
    fs: Vec<DeviceSpec>,
    /// A virtio-blk device served by a vhost-user backend: socket=PATH.
    #[arg(long, value_name = "SPEC", value_parser = parse_device)]
    blk: Vec<DeviceSpec>,
    /// A virtio-net device served by a vhost-user backend:
    /// socket=PATH[,queues=N] (the MAC is the backend's config space).
    #[arg(long, value_name = "SPEC", value_parser = parse_device)]
    net: Vec<DeviceSpec>,
    /// The JSON control API's socket: status, pause, resume, shutdown.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// What a thread's seccomp filter does with a syscall outside its
    /// role's allowlist: kill the process, log it, or no filter at all.
    #[arg(long, value_enum, default_value_t = backend_common::seccomp::Action::Kill)]
    seccomp: backend_common::seccomp::Action,
    /// How long a device waits for its backend to serve again after it hung
    /// up, in milliseconds; then the device stays down (and is tried again
    /// whenever its socket is served later).
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    reconnect_wait_ms: u64,
    /// Log filter (error, warn, info, debug, trace).
    #[arg(long, default_value = "warn")]
    log_level: String,
}

/// `socket=PATH[,queues=N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DeviceSpec {
    socket: PathBuf,
    queues: Option<usize>,
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    let mut socket = None;
    let mut queues = None;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("socket", p)) if !p.is_empty() => socket = Some(PathBuf::from(p)),
            Some(("queues", n)) => {
                queues = Some(
                    n.parse::<usize>()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| format!("queues={n}: 1 to 64"))?,
                )
            }
            _ => return Err(format!("`{part}`: expected socket=PATH or queues=N")),
        }
    }
    Ok(DeviceSpec {
        socket: socket.ok_or("socket=PATH is required")?,
        queues,
    })
}

#[derive(Debug, Clone)]
enum Serial {
    Stdio,
    File(PathBuf),
    Off,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("`{s}`: use a K, M or G suffix (or none for MiB)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1 << 20),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 512M or 2G"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn parse_serial(s: &str) -> Result<Serial, String> {
    match s {
        "stdio" => Ok(Serial::Stdio),
        "off" => Ok(Serial::Off),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(Serial::File(PathBuf::from(p))),
            _ => Err(format!("`{s}`: use stdio, file:PATH or off")),
        },
    }
}

/// An error and its causes, each said once.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn main() -> ExitCode {
    let a = Args::parse();
    if let Err(e) = backend_common::init_logging(&a.log_level) {
        eprintln!("vmm-core: {e}");
        return ExitCode::from(2);
    }
    match run(a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm-core: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(a: Args) -> Result<ExitCode, String> {
    let err = |e: &dyn std::error::Error| chain(e);
    let ram = GuestRam::new(a.memory).map_err(|e| err(&e))?;
    let console: Box<dyn Write + Send> = match &a.serial {
        Serial::Stdio => Box::new(std::io::stdout()),
        Serial::Off => Box::new(std::io::sink()),
        Serial::File(p) => Box::new(
            std::fs::File::create(p).map_err(|e| format!("serial file {}: {e}", p.display()))?,
        ),
    };
    let mem = ram.mem.clone();
    let mut m = Machine::new(ram, a.cpus, console).map_err(|e| err(&e))?;
    // Device types (virtio 1.2, 5): net 1, blk 2, fs 26; default queues.
    let devices = a
        .net
        .iter()
        .map(|d| (1, 2, d))
        .chain(a.blk.iter().map(|d| (2, 1, d)))
        .chain(a.fs.iter().map(|d| (26, 2, d)));
    let mut cmdline = a.cmdline.clone();
    let mut slots = Vec::new();
    let mut counters = Vec::new();
    for (kind, queues, d) in devices {
        let dev = VhostUserDevice::connect(&d.socket, kind, &mem, d.queues.unwrap_or(queues), 256)
            .map_err(|e| err(&e))?;
        counters.push(dev.reconnect_counter());
        let slot = m.add_virtio_mmio(dev).map_err(|e| err(&e))?;
        slots.push(slot);
        // For kernels built with VIRTIO_MMIO_CMDLINE_DEVICES; the others
        // find the devices in the DSDT.
        cmdline.push_str(&format!(
            " virtio_mmio.device=4K@{:#x}:{}",
            slot.base, slot.irq
        ));
    }
    if let Some(path) = &a.api_socket {
        let devices = a
            .net
            .iter()
            .map(|d| ("net", d))
            .chain(a.blk.iter().map(|d| ("blk", d)))
            .chain(a.fs.iter().map(|d| ("fs", d)))
            .zip(counters)
            .map(|((kind, d), reconnects)| vmm_core::api::DeviceInfo {
                kind,
                socket: d.socket.clone(),
                reconnects,
            })
            .collect();
        let info = vmm_core::api::VmInfo {
            vcpus: a.cpus,
            memory: a.memory,
            devices,
        };
        vmm_core::api::serve(path, m.control(), info, a.seccomp)
            .map_err(|e| format!("control API socket {}: {e}", path.display()))?;
    }
    let rsdp = vmm_core::acpi::write_tables(&mem, a.cpus, &slots)?;
    let entry = boot::load_linux(
        m.ram(),
        &a.kernel,
        a.initramfs.as_deref(),
        &cmdline,
        Some(rsdp),
    )
    .map_err(|e| err(&e))?;
    m.start_long_mode(entry.rip, entry.rsi)
        .map_err(|e| err(&e))?;
    if matches!(a.serial, Serial::Stdio) {
        let input = m.console_input();
        let seccomp = a.seccomp;
        std::thread::spawn(move || {
            if let Err(e) = vmm_core::seccomp::install(vmm_core::seccomp::Role::Vmm, seccomp) {
                eprintln!("vmm-core: {e}; no console input");
                return;
            }
            let mut b = [0u8; 64];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut b) {
                if n == 0 {
                    break;
                }
                input(&b[..n]);
            }
        });
    }
    m.set_seccomp(a.seccomp);
    m.set_reconnect_wait(std::time::Duration::from_millis(a.reconnect_wait_ms));
    let stop = m.run();
    let _ = std::io::stdout().flush();
    Ok(match stop {
        Stop::Reset => ExitCode::SUCCESS,
        Stop::DebugExit(c) => ExitCode::from(c),
        Stop::Halted => {
            eprintln!("vmm-core: the guest halted");
            ExitCode::SUCCESS
        }
        Stop::Shutdown => {
            eprintln!("vmm-core: the guest triple-faulted");
            ExitCode::from(1)
        }
        Stop::Requested => {
            eprintln!("vmm-core: shut down through the control API");
            ExitCode::SUCCESS
        }
        Stop::Failed(why) => {
            eprintln!("vmm-core: {why}");
            ExitCode::from(1)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_serial_specs() {
        assert_eq!(parse_size("512").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5T").is_err());
        assert!(matches!(
            parse_serial("file:/tmp/x").unwrap(),
            Serial::File(_)
        ));
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp").is_err());
    }

    #[test]
    fn device_specs() {
        assert_eq!(
            parse_device("socket=/run/b.sock,queues=2").unwrap(),
            DeviceSpec {
                socket: "/run/b.sock".into(),
                queues: Some(2)
            }
        );
        assert!(parse_device("queues=2")
            .unwrap_err()
            .contains("socket=PATH"));
        assert!(parse_device("socket=/s,queues=0").is_err());
        assert!(parse_device("socket=/s,tag=x")
            .unwrap_err()
            .contains("tag=x"));
    }
}
