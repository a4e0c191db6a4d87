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
    /// Settings from a TOML (or, ending in .json, JSON) file with the same
    /// names as these flags (`kernel`, `cpus`, `[[blk]] socket = ...`);
    /// flags given here win over the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The kernel: an ELF vmlinux or a bzImage (here or in --config).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
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
    /// Back guest memory with 2 MiB huge pages (hugetlbfs): the kernel
    /// loads with one page fault per 2 MiB, and the guest's TLB reaches
    /// further. The host must have them reserved (vm.nr_hugepages).
    #[arg(long)]
    hugepages: bool,
    /// Where the serial console goes: stdio, file:PATH, socket:PATH (a Unix
    /// socket to connect to; input goes to the guest) or off.
    #[arg(long, default_value = "stdio", value_parser = parse_serial)]
    serial: Serial,
    /// A virtio-fs device served by a vhost-user backend:
    /// socket=PATH[,tag=TAG][,queues=N]; the backend sets the tag, and a
    /// tag given here is checked against it.
    #[arg(long, value_name = "SPEC", value_parser = parse_device)]
    fs: Vec<DeviceSpec>,
    /// A virtio-blk device served by a vhost-user backend: socket=PATH.
    #[arg(long, value_name = "SPEC", value_parser = parse_device)]
    blk: Vec<DeviceSpec>,
    /// A virtio-net device served by a vhost-user backend:
    /// socket=PATH[,mac=MAC][,queues=N]; the backend sets the MAC, and a
    /// MAC given here is checked against it.
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

/// `socket=PATH[,queues=N][,tag=TAG][,mac=MAC]`, or a table in --config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceSpec {
    socket: PathBuf,
    queues: Option<usize>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    mac: Option<String>,
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    let mut socket = None;
    let mut queues = None;
    let (mut tag, mut mac) = (None, None);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("socket", p)) if !p.is_empty() => socket = Some(PathBuf::from(p)),
            Some(("tag", t)) if !t.is_empty() && t.len() <= 36 => tag = Some(t.to_string()),
            Some(("mac", m)) if parse_mac(m).is_some() => mac = Some(m.to_string()),
            Some(("queues", n)) => {
                queues = Some(
                    n.parse::<usize>()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| format!("queues={n}: 1 to 64"))?,
                )
            }
            _ => {
                return Err(format!(
                    "`{part}`: expected socket=PATH, queues=N, tag=TAG (1 to 36 bytes) \
                     or mac=aa:bb:cc:dd:ee:ff"
                ))
            }
        }
    }
    Ok(DeviceSpec {
        socket: socket.ok_or("socket=PATH is required")?,
        queues,
        tag,
        mac,
    })
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// What --config may hold: the flags' names, every one optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    cmdline: Option<String>,
    cpus: Option<u8>,
    memory: Option<String>,
    hugepages: Option<bool>,
    serial: Option<String>,
    #[serde(default)]
    fs: Vec<DeviceSpec>,
    #[serde(default)]
    blk: Vec<DeviceSpec>,
    #[serde(default)]
    net: Vec<DeviceSpec>,
    api_socket: Option<PathBuf>,
    log_level: Option<String>,
    seccomp: Option<String>,
    reconnect_wait_ms: Option<u64>,
}

/// Fill in from `file` what the command line did not say.
fn merge(a: &mut Args, m: &clap::ArgMatches, path: &std::path::Path) -> Result<(), String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    let f: FileConfig = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| format!("--config {}: {e}", path.display()))?
    } else {
        toml::from_str(&text).map_err(|e| format!("--config {}: {e}", path.display()))?
    };
    let given = |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    let bad = |what: &str, e: String| format!("--config {}: {what}: {e}", path.display());
    if a.kernel.is_none() {
        a.kernel = f.kernel;
    }
    if a.initramfs.is_none() {
        a.initramfs = f.initramfs;
    }
    if !given("cmdline") {
        if let Some(c) = f.cmdline {
            a.cmdline = c;
        }
    }
    if !given("cpus") {
        if let Some(c) = f.cpus {
            if !(1..=64).contains(&c) {
                return Err(bad("cpus", format!("{c}: 1 to 64")));
            }
            a.cpus = c;
        }
    }
    if !given("memory") {
        if let Some(v) = f.memory {
            a.memory = parse_size(&v).map_err(|e| bad("memory", e))?;
        }
    }
    if !given("hugepages") {
        a.hugepages = f.hugepages.unwrap_or(false);
    }
    if !given("serial") {
        if let Some(v) = f.serial {
            a.serial = parse_serial(&v).map_err(|e| bad("serial", e))?;
        }
    }
    for (flag, mine, theirs) in [
        ("fs", &mut a.fs, f.fs),
        ("blk", &mut a.blk, f.blk),
        ("net", &mut a.net, f.net),
    ] {
        if !given(flag) {
            for d in &theirs {
                if let Some(m) = &d.mac {
                    parse_mac(m).ok_or_else(|| bad(flag, format!("mac `{m}`")))?;
                }
            }
            *mine = theirs;
        }
    }
    if a.api_socket.is_none() {
        a.api_socket = f.api_socket;
    }
    if !given("log_level") {
        if let Some(l) = f.log_level {
            a.log_level = l;
        }
    }
    if !given("seccomp") {
        if let Some(v) = f.seccomp {
            a.seccomp = <backend_common::seccomp::Action as clap::ValueEnum>::from_str(&v, true)
                .map_err(|e| bad("seccomp", e))?;
        }
    }
    if !given("reconnect_wait_ms") {
        if let Some(v) = f.reconnect_wait_ms {
            a.reconnect_wait_ms = v;
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Serial {
    Stdio,
    File(PathBuf),
    Socket(PathBuf),
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
        _ => match (s.strip_prefix("file:"), s.strip_prefix("socket:")) {
            (Some(p), _) if !p.is_empty() => Ok(Serial::File(PathBuf::from(p))),
            (_, Some(p)) if !p.is_empty() => Ok(Serial::Socket(PathBuf::from(p))),
            _ => Err(format!("`{s}`: use stdio, file:PATH, socket:PATH or off")),
        },
    }
}

/// A tag (virtio-fs) or MAC (virtio-net) given with the device must be
/// what the backend's config space says: vmm-core cannot change either.
fn check_identity(dev: &mut VhostUserDevice, kind: u32, d: &DeviceSpec) -> Result<(), String> {
    use vmm_core::virtio_mmio::VirtioDevice;
    let sock = d.socket.display();
    if let (26, Some(want)) = (kind, &d.tag) {
        let mut tag = [0u8; 36];
        dev.read_config(0, &mut tag);
        let end = tag.iter().position(|&b| b == 0).unwrap_or(tag.len());
        let got = String::from_utf8_lossy(&tag[..end]);
        if got != *want {
            return Err(format!(
                "--fs socket={sock}: the backend serves tag `{got}`, not `{want}` (its --tag sets it)"
            ));
        }
    }
    if let (1, Some(want)) = (kind, &d.mac) {
        let mut mac = [0u8; 6];
        dev.read_config(0, &mut mac);
        if Some(mac) != parse_mac(want) {
            let got: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
            return Err(format!(
                "--net socket={sock}: the backend's MAC is {}, not {want} (its --mac sets it)",
                got.join(":")
            ));
        }
    }
    Ok(())
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
    use clap::{CommandFactory, FromArgMatches};
    let matches = Args::command().get_matches();
    let mut a = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if let Some(path) = a.config.clone() {
        if let Err(e) = merge(&mut a, &matches, &path) {
            eprintln!("vmm-core: {e}");
            return ExitCode::from(2);
        }
    }
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

/// The console on a Unix socket: output to whoever is connected (dropped
/// while nobody is), their input to the guest.
#[derive(Clone, Default)]
struct SocketConsole(std::sync::Arc<std::sync::Mutex<Option<std::os::unix::net::UnixStream>>>);

impl Write for SocketConsole {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slot.as_mut() {
            if s.write_all(b).is_err() {
                *slot = None;
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn run(a: Args) -> Result<ExitCode, String> {
    let err = |e: &dyn std::error::Error| chain(e);
    let Some(kernel) = a.kernel.clone() else {
        return Err("no kernel: give --kernel PATH (or `kernel = ...` in --config)".into());
    };
    let ram = GuestRam::with_pages(a.memory, a.hugepages).map_err(|e| err(&e))?;
    // Copying the kernel in is most of start-up; it needs only the memory,
    // so it runs while the VM and its devices are set up.
    let loader = {
        let (mem, low_end) = (ram.mem.clone(), ram.low_end());
        let (kernel, initramfs) = (kernel.clone(), a.initramfs.clone());
        std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || boot::load_images(&mem, low_end, &kernel, initramfs.as_deref()))
            .map_err(|e| format!("starting the kernel loader thread: {e}"))?
    };
    let mut serial_socket = None;
    let console: Box<dyn Write + Send> = match &a.serial {
        Serial::Stdio => Box::new(std::io::stdout()),
        Serial::Off => Box::new(std::io::sink()),
        Serial::File(p) => Box::new(
            std::fs::File::create(p).map_err(|e| format!("serial file {}: {e}", p.display()))?,
        ),
        Serial::Socket(p) => {
            if p.exists() && std::os::unix::net::UnixStream::connect(p).is_err() {
                let _ = std::fs::remove_file(p);
            }
            let l = std::os::unix::net::UnixListener::bind(p)
                .map_err(|e| format!("serial socket {}: {e}", p.display()))?;
            let c = SocketConsole::default();
            serial_socket = Some((l, c.clone()));
            Box::new(c)
        }
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
        let mut dev =
            VhostUserDevice::connect(&d.socket, kind, &mem, d.queues.unwrap_or(queues), 256)
                .map_err(|e| err(&e))?;
        counters.push(dev.reconnect_counter());
        check_identity(&mut dev, kind, d)?;
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
    let images = loader
        .join()
        .map_err(|_| "the kernel loader thread panicked".to_string())?
        .map_err(|e| err(&e))?;
    let entry = boot::finish_boot(m.ram(), images, &cmdline, Some(rsdp)).map_err(|e| err(&e))?;
    m.start_long_mode(entry.rip, entry.rsi)
        .map_err(|e| err(&e))?;
    if let Some((listener, console)) = serial_socket {
        let input = m.console_input();
        let seccomp = a.seccomp;
        std::thread::spawn(move || {
            // Accepting and reading clients is the API role's work too.
            if let Err(e) = vmm_core::seccomp::install(vmm_core::seccomp::Role::Api, seccomp) {
                eprintln!("vmm-core: {e}; no serial socket");
                return;
            }
            for client in listener.incoming().flatten() {
                let Ok(reader) = client.try_clone() else {
                    continue;
                };
                *console.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(client);
                let mut reader = reader;
                let mut b = [0u8; 64];
                while let Ok(n) = reader.read(&mut b) {
                    if n == 0 {
                        break;
                    }
                    input(&b[..n]);
                }
            }
        });
    }
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
        Stop::PowerOff => {
            eprintln!("vmm-core: the guest powered off");
            ExitCode::SUCCESS
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
                queues: Some(2),
                tag: None,
                mac: None,
            }
        );
        assert!(parse_device("queues=2")
            .unwrap_err()
            .contains("socket=PATH"));
        assert!(parse_device("socket=/s,queues=0").is_err());
        assert_eq!(
            parse_device("socket=/s,tag=host").unwrap().tag.as_deref(),
            Some("host")
        );
        assert!(parse_device("socket=/s,mac=52:54:00:12:34:zz")
            .unwrap_err()
            .contains("mac=aa:bb"));
        assert!(parse_device("socket=/s,tag=").is_err());
        assert!(parse_device("socket=/s,path=x")
            .unwrap_err()
            .contains("path=x"));
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert!(matches!(
            parse_serial("socket:/run/c.sock").unwrap(),
            Serial::Socket(_)
        ));
    }

    #[test]
    fn the_socket_console_writes_to_its_client_and_drops_output_without_one() {
        use std::io::Read;
        let mut c = SocketConsole::default();
        c.write_all(b"lost ").unwrap();
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        *c.0.lock().unwrap() = Some(ours);
        c.write_all(b"seen").unwrap();
        *c.0.lock().unwrap() = None;
        let mut got = String::new();
        theirs.read_to_string(&mut got).unwrap();
        assert_eq!(got, "seen");
        // A client that went away is forgotten, not an error for the guest.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(theirs);
        *c.0.lock().unwrap() = Some(ours);
        c.write_all(b"x").unwrap();
        c.write_all(b"y").unwrap();
        assert!(c.0.lock().unwrap().is_none());
    }

    fn parse_with_config(argv: &[&str], file: &str, ext: &str) -> Result<Args, String> {
        use clap::{CommandFactory, FromArgMatches};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("vm.{ext}"));
        std::fs::write(&path, file).unwrap();
        let mut full = vec![
            "vmm-core".to_string(),
            format!("--config={}", path.display()),
        ];
        full.extend(argv.iter().map(|s| s.to_string()));
        let m = Args::command()
            .try_get_matches_from(full)
            .map_err(|e| e.to_string())?;
        let mut a = Args::from_arg_matches(&m).map_err(|e| e.to_string())?;
        merge(&mut a, &m, &path)?;
        Ok(a)
    }

    #[test]
    fn a_config_file_fills_in_what_the_flags_do_not_say() {
        let toml = r#"
kernel = "/boot/vmlinuz"
cpus = 4
memory = "2G"
hugepages = true
serial = "off"
api-socket = "/run/vm.sock"
reconnect-wait-ms = 5000
[[blk]]
socket = "/run/blk0.sock"
[[fs]]
socket = "/run/fs0.sock"
tag = "host"
queues = 2
"#;
        let a = parse_with_config(&["--cpus", "2"], toml, "toml").unwrap();
        assert_eq!(
            a.kernel.as_deref(),
            Some(std::path::Path::new("/boot/vmlinuz"))
        );
        assert_eq!(a.cpus, 2, "the flag wins");
        assert_eq!(a.memory, 2 << 30);
        assert!(a.hugepages);
        assert!(matches!(a.serial, Serial::Off));
        assert_eq!(a.blk.len(), 1);
        assert_eq!(a.fs[0].tag.as_deref(), Some("host"));
        assert_eq!(a.fs[0].queues, Some(2));
        assert_eq!(a.reconnect_wait_ms, 5000);
        assert_eq!(
            a.api_socket.as_deref(),
            Some(std::path::Path::new("/run/vm.sock"))
        );
        // The same in JSON.
        let a = parse_with_config(
            &[],
            r#"{"kernel": "/k", "blk": [{"socket": "/b"}], "seccomp": "log"}"#,
            "json",
        )
        .unwrap();
        assert_eq!(a.blk[0].socket, std::path::Path::new("/b"));
        assert_eq!(a.seccomp, backend_common::seccomp::Action::Log);
        // Mistakes are named.
        let e = parse_with_config(&[], "kernal = \"/k\"", "toml").unwrap_err();
        assert!(e.contains("kernal"), "{e}");
        let e = parse_with_config(&[], "memory = \"lots\"", "toml").unwrap_err();
        assert!(e.contains("memory"), "{e}");
        let e =
            parse_with_config(&[], "[[net]]\nsocket = \"/n\"\nmac = \"x\"", "toml").unwrap_err();
        assert!(e.contains("mac"), "{e}");
    }
}
