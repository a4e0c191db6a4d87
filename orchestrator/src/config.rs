//! The VM config file (TOML): one `[vm]` table, then `[[fs]]`, `[[blk]]`
//! and `[[net]]` devices. Unknown keys are errors, and every error names
//! the file, the line and the key.
//!
//! ```toml
//! [vm]
//! name = "dev"
//! cpus = 2
//! memory = "2G"
//! vmm = "auto"          # auto | core | qemu
//! hugepages = false     # guest memory in 2 MiB huge pages (vm.nr_hugepages)
//!
//! [[fs]]
//! shared_dir = "~/project"
//! tag = "project"
//! cache = "coherent"
//! announce_submounts = false   # mounts inside the share: their own mounts in the guest
//! xattr = false                # extended attributes passed through
//! posix_acl = false            # POSIX ACLs (implies xattr)
//!
//! [[blk]]
//! image = "/var/lib/vm/disk.img"
//! readonly = false
//! queues = 2
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// Which VMM runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VmmChoice {
    /// vmm-core where the CPU has hardware virtualization, else QEMU.
    #[default]
    Auto,
    Core,
    Qemu,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub vm: Vm,
    #[serde(default)]
    pub fs: Vec<Fs>,
    #[serde(default)]
    pub blk: Vec<Blk>,
    #[serde(default)]
    pub net: Vec<Spanned<Net>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Names the state directory; "default" when absent.
    pub name: Option<String>,
    /// Kernel (bzImage or ELF vmlinux); the default image's when absent.
    pub kernel: Option<Spanned<PathBuf>>,
    pub initramfs: Option<Spanned<PathBuf>>,
    /// Appended to the kernel command line.
    pub cmdline: Option<String>,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// "512M", "2G" or a number of MiB.
    #[serde(default)]
    pub memory: Option<Spanned<Memory>>,
    #[serde(default)]
    pub vmm: VmmChoice,
    /// Guest memory in 2 MiB huge pages (the host's vm.nr_hugepages).
    #[serde(default)]
    pub hugepages: Option<Spanned<bool>>,
}

fn default_cpus() -> u32 {
    1
}

/// A memory size: a number of MiB or a string with an M or G suffix.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Memory {
    Mib(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fs {
    pub shared_dir: Spanned<PathBuf>,
    pub tag: Spanned<String>,
    /// virtiofsd-fast's --cache.
    pub cache: Option<String>,
    /// virtiofsd-fast's --announce-submounts: filesystems mounted inside
    /// the share are mounts of their own in the guest.
    #[serde(default)]
    pub announce_submounts: bool,
    /// virtiofsd-fast's --xattr.
    #[serde(default)]
    pub xattr: bool,
    /// virtiofsd-fast's --posix-acl (implies --xattr).
    #[serde(default)]
    pub posix_acl: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blk {
    pub image: Spanned<PathBuf>,
    #[serde(default)]
    pub readonly: bool,
    /// O_DIRECT on the host (blk-backend --direct): no host page cache.
    #[serde(default)]
    pub direct: bool,
    pub queues: Option<u16>,
    pub serial: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Net {
    pub tap: Option<String>,
    pub socket: Option<PathBuf>,
    pub listen: Option<PathBuf>,
    pub user: Option<bool>,
    pub tcp_forward: Option<Vec<String>>,
    pub udp_forward: Option<Vec<String>>,
    pub mac: Option<String>,
    pub queues: Option<u16>,
}

/// A config error, located.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// A checked config, with sizes resolved and paths made absolute.
#[derive(Debug)]
pub struct VmConfig {
    pub name: String,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub hugepages: bool,
    pub vmm: VmmChoice,
    pub fs: Vec<FsDevice>,
    pub blk: Vec<BlkDevice>,
    pub net: Vec<NetDevice>,
}

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetLink {
    /// A tap the orchestrator opens (creating it if needed) and hands over.
    Tap(String),
    /// A SOCK_SEQPACKET peer listening at this path.
    Socket(PathBuf),
    /// Listen at this path for a peer (another VM's `socket`).
    Listen(PathBuf),
    /// A user-mode network through passt (no root, no tap): the guest is
    /// 10.0.2.15/24, the host's loopback answers at the gateway 10.0.2.2,
    /// DNS at 10.0.2.3; host TCP and UDP ports forwarded to the guest, in
    /// passt's `-t` / `-u` form (`8080:80`: host 8080 to guest 80).
    User {
        tcp_forward: Vec<String>,
        udp_forward: Vec<String>,
    },
}

#[derive(Debug, Clone)]
pub struct NetDevice {
    pub link: NetLink,
    pub mac: String,
    /// Queue pairs (a tap only).
    pub queues: u16,
}

#[derive(Debug, Clone)]
pub struct FsDevice {
    pub shared_dir: PathBuf,
    pub tag: String,
    pub cache: Option<String>,
    pub announce_submounts: bool,
    pub xattr: bool,
    pub posix_acl: bool,
}

#[derive(Debug, Clone)]
pub struct BlkDevice {
    pub image: PathBuf,
    pub readonly: bool,
    pub direct: bool,
    pub queues: Option<u16>,
    pub serial: Option<String>,
}

struct Locator<'a> {
    file: &'a str,
    text: &'a str,
}

impl Locator<'_> {
    fn at(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> ConfigError {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        ConfigError {
            file: self.file.to_string(),
            line,
            column,
            message: message.into(),
        }
    }
}

/// Read and check `path`.
pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: 0,
        column: 0,
        message: format!("cannot read it: {e}"),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&file, &text, base)
}

/// Parse and check config `text` (named `file` in errors); relative paths
/// are taken from `base`.
pub fn parse(file: &str, text: &str, base: &Path) -> Result<VmConfig, ConfigError> {
    let loc = Locator { file, text };
    let raw: Config = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        loc.at(span, e.message().to_string())
    })?;
    let resolve = |p: &Spanned<PathBuf>, key: &str, want_dir: bool| {
        let path = expand(p.get_ref(), base);
        let ok = if want_dir {
            path.is_dir()
        } else {
            path.is_file() || path.metadata().map(|m| !m.is_dir()).unwrap_or(false)
        };
        if ok {
            Ok(path)
        } else {
            let what = if want_dir { "a directory" } else { "a file" };
            Err(loc.at(
                p.span(),
                format!("{key}: {} is not {what} that exists", path.display()),
            ))
        }
    };
    let kernel = raw
        .vm
        .kernel
        .as_ref()
        .map(|k| resolve(k, "vm.kernel", false))
        .transpose()?;
    let initramfs = raw
        .vm
        .initramfs
        .as_ref()
        .map(|k| resolve(k, "vm.initramfs", false))
        .transpose()?;
    let memory_mib = match &raw.vm.memory {
        None => 1024,
        Some(m) => memory_mib(m.get_ref()).ok_or_else(|| {
            loc.at(
                m.span(),
                "vm.memory: write a number of MiB, or a size such as \"512M\" or \"2G\"",
            )
        })?,
    };
    let hugepages = raw.vm.hugepages.as_ref().is_some_and(|h| *h.get_ref());
    if let Some(h) = raw.vm.hugepages.as_ref().filter(|_| hugepages) {
        // Checked here, before anything starts: a VMM short of huge pages
        // fails (QEMU) or must refuse (vmm-core) only once it is up.
        let need = memory_mib.div_ceil(2);
        let free = crate::free_huge_pages();
        if free < need {
            return Err(loc.at(
                h.span(),
                format!(
                    "vm.hugepages: the VM needs {need} free 2 MiB huge pages and the host has \
                     {free}; reserve them (sysctl vm.nr_hugepages=N) or set hugepages = false"
                ),
            ));
        }
    }
    if raw.vm.cpus == 0 || raw.vm.cpus > 255 {
        return Err(loc.at(0..0, "vm.cpus: from 1 to 255"));
    }
    let mut fs = Vec::new();
    for (i, f) in raw.fs.iter().enumerate() {
        let shared_dir = resolve(&f.shared_dir, &format!("fs[{i}].shared_dir"), true)?;
        if f.tag.get_ref().is_empty() || f.tag.get_ref().len() > 36 {
            return Err(loc.at(f.tag.span(), format!("fs[{i}].tag: 1 to 36 bytes")));
        }
        if raw.fs[..i]
            .iter()
            .any(|o| o.tag.get_ref() == f.tag.get_ref())
        {
            return Err(loc.at(
                f.tag.span(),
                format!(
                    "fs[{i}].tag: \"{}\" is already used by another [[fs]]",
                    f.tag.get_ref()
                ),
            ));
        }
        fs.push(FsDevice {
            shared_dir,
            tag: f.tag.get_ref().clone(),
            cache: f.cache.clone(),
            announce_submounts: f.announce_submounts,
            xattr: f.xattr,
            posix_acl: f.posix_acl,
        });
    }
    let mut blk = Vec::new();
    for (i, b) in raw.blk.iter().enumerate() {
        let image = resolve(&b.image, &format!("blk[{i}].image"), false)?;
        if blk.iter().any(|o: &BlkDevice| o.image == image) {
            return Err(loc.at(
                b.image.span(),
                format!(
                    "blk[{i}].image: {} is already another [[blk]]",
                    image.display()
                ),
            ));
        }
        if image_in_use(&image) {
            return Err(loc.at(
                b.image.span(),
                format!(
                    "blk[{i}].image: {} is in use by another VM (a backend holds its lock); \
                     stop that VM first",
                    image.display()
                ),
            ));
        }
        if let Some(s) = &b.serial {
            if s.len() > 20 {
                return Err(loc.at(0..0, format!("blk[{i}].serial: at most 20 bytes")));
            }
        }
        blk.push(BlkDevice {
            image,
            readonly: b.readonly,
            direct: b.direct,
            queues: b.queues,
            serial: b.serial.clone(),
        });
    }
    let mut net = Vec::new();
    for (i, n) in raw.net.iter().enumerate() {
        let v = n.get_ref();
        let user = v.user.unwrap_or(false);
        let forwards = [
            ("tcp_forward", &v.tcp_forward),
            ("udp_forward", &v.udp_forward),
        ];
        for (key, list) in forwards {
            if list.is_some() && !user {
                return Err(loc.at(
                    n.span(),
                    format!("net[{i}].{key}: only for a user-mode NIC (user = true)"),
                ));
            }
            if let Some(bad) = list.iter().flatten().find(|f| !port_forward_ok(f)) {
                return Err(loc.at(
                    n.span(),
                    format!(
                        "net[{i}].{key}: `{bad}` is not HOST[:GUEST] ports \
                         (1-65535, or ranges like 8000-8010), e.g. \"8080:80\""
                    ),
                ));
            }
        }
        let link = match (&v.tap, &v.socket, &v.listen) {
            (None, None, None) if user => NetLink::User {
                tcp_forward: v.tcp_forward.clone().unwrap_or_default(),
                udp_forward: v.udp_forward.clone().unwrap_or_default(),
            },
            _ if user => {
                return Err(loc.at(
                    n.span(),
                    format!("net[{i}]: one of tap, socket, listen or user, not several"),
                ))
            }
            (Some(t), None, None) if t.is_empty() || t.len() > 15 => {
                return Err(loc.at(n.span(), format!("net[{i}].tap: 1 to 15 bytes")))
            }
            (Some(t), None, None) => NetLink::Tap(t.clone()),
            (None, Some(p), None) => NetLink::Socket(expand(p, base)),
            (None, None, Some(p)) => NetLink::Listen(expand(p, base)),
            (None, None, None) => NetLink::Tap(
                format!("vmm{}n{i}", raw.vm.name.as_deref().unwrap_or(""))
                    .chars()
                    .take(15)
                    .collect(),
            ),
            _ => {
                return Err(loc.at(
                    n.span(),
                    format!("net[{i}]: one of tap, socket, listen or user, not several"),
                ))
            }
        };
        let queues = v.queues.unwrap_or(1);
        if !(1..=16).contains(&queues) {
            return Err(loc.at(
                n.span(),
                format!("net[{i}].queues: {queues} queue pairs; 1 to 16"),
            ));
        }
        if queues > 1 && !matches!(link, NetLink::Tap(_)) {
            return Err(loc.at(
                n.span(),
                format!("net[{i}].queues: more than one queue pair needs a tap"),
            ));
        }
        let mac = match &v.mac {
            Some(m) => {
                if m.split(':').count() != 6
                    || m.split(':').any(|b| u8::from_str_radix(b, 16).is_err())
                {
                    return Err(loc.at(
                        n.span(),
                        format!("net[{i}].mac: `{m}` is not like 52:54:00:12:34:56"),
                    ));
                }
                m.clone()
            }
            None => format!("52:54:00:12:34:{:02x}", 0x56 + i),
        };
        net.push(NetDevice { link, mac, queues });
    }
    Ok(VmConfig {
        name: raw.vm.name.clone().unwrap_or_else(|| "default".into()),
        kernel,
        initramfs,
        cmdline: raw.vm.cmdline.clone(),
        cpus: raw.vm.cpus,
        memory_mib,
        hugepages,
        vmm: raw.vm.vmm,
        fs,
        blk,
        net,
    })
}

/// Whether a backend (ours holds a flock on its image) is using `path`.
fn image_in_use(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    // SAFETY: flock on our own descriptor; a shared lock is refused only
    // while someone holds the exclusive one, and is dropped with `f`.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
}

fn memory_mib(m: &Memory) -> Option<u64> {
    match m {
        Memory::Mib(n) if *n >= 64 => Some(*n),
        Memory::Mib(_) => None,
        Memory::Text(t) => {
            let t = t.trim();
            let (num, mul) = match t.chars().last()? {
                'G' | 'g' => (&t[..t.len() - 1], 1024),
                'M' | 'm' => (&t[..t.len() - 1], 1),
                _ => (t, 1),
            };
            let n: u64 = num.trim().parse().ok()?;
            Some(n * mul).filter(|&m| m >= 64)
        }
    }
}

/// `-p` port forwards, checked.
pub fn check_publish(ports: &[String]) -> Result<(), String> {
    match ports.iter().find(|p| split_publish(p).is_none()) {
        Some(bad) => Err(format!(
            "--publish {bad}: not HOST[:GUEST] ports (1-65535, or ranges like 8000-8010), \
             then /tcp (the default) or /udp, e.g. -p 8080:80 or -p 5353:53/udp"
        )),
        None => Ok(()),
    }
}

/// A `-p` forward's ports and whether it is UDP.
fn split_publish(spec: &str) -> Option<(&str, bool)> {
    let (ports, udp) = match spec.rsplit_once('/') {
        Some((p, "tcp")) => (p, false),
        Some((p, "udp")) => (p, true),
        Some(_) => return None,
        None => (spec, false),
    };
    port_forward_ok(ports).then_some((ports, udp))
}

/// Add `-p` port forwards to the VM's first user-mode NIC.
pub fn publish(cfg: &mut VmConfig, ports: &[String]) -> Result<(), String> {
    check_publish(ports)?;
    if ports.is_empty() {
        return Ok(());
    }
    let nic = cfg.net.iter_mut().find_map(|n| match &mut n.link {
        NetLink::User {
            tcp_forward,
            udp_forward,
        } => Some((tcp_forward, udp_forward)),
        _ => None,
    });
    match nic {
        Some((tcp, udp)) => {
            for p in ports {
                if let Some((range, is_udp)) = split_publish(p) {
                    if is_udp { &mut *udp } else { &mut *tcp }.push(range.to_string());
                }
            }
            Ok(())
        }
        None => Err(format!(
            "--publish needs a user-mode NIC, and VM `{}` has none: in its config, a [[net]] \
             with user = true; the default VM has one where passt is installed (apt-get install passt)",
            cfg.name
        )),
    }
}

/// A port forward as passt takes it: a port or range on the host, and
/// optionally `:` and the port or range on the guest (ranges of one size).
fn port_forward_ok(spec: &str) -> bool {
    let range = |r: &str| -> Option<(u16, u16)> {
        let (a, b) = r.split_once('-').unwrap_or((r, r));
        let (a, b) = (a.parse::<u16>().ok()?, b.parse::<u16>().ok()?);
        (a >= 1 && a <= b).then_some((a, b))
    };
    let (host, guest) = spec.split_once(':').unwrap_or((spec, spec));
    match (range(host), range(guest)) {
        (Some((a, b)), Some((c, d))) => b - a == d - c,
        _ => false,
    }
}

/// `~/x` from $HOME, relative paths from the config's directory.
fn expand(p: &Path, base: &Path) -> PathBuf {
    if let Ok(rest) = p.strip_prefix("~") {
        if let Some(home) = std::env::var_os("HOME") {
            return PathBuf::from(home).join(rest);
        }
    }
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<VmConfig, ConfigError> {
        parse("vm.toml", text, Path::new("/"))
    }

    #[test]
    fn a_full_config() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, b"").unwrap();
        let text = format!(
            "[vm]\nname = \"dev\"\ncpus = 2\nmemory = \"2G\"\nvmm = \"qemu\"\n\n\
             [[fs]]\nshared_dir = \"{d}\"\ntag = \"project\"\ncache = \"always\"\n\
             announce_submounts = true\nposix_acl = true\n\n\
             [[blk]]\nimage = \"{i}\"\nreadonly = true\nqueues = 2\n",
            d = dir.path().display(),
            i = img.display()
        );
        let c = check(&text).unwrap();
        assert_eq!(c.name, "dev");
        assert_eq!(c.memory_mib, 2048);
        assert_eq!(c.vmm, VmmChoice::Qemu);
        assert_eq!(c.fs[0].tag, "project");
        assert!(c.fs[0].announce_submounts);
        assert!(c.fs[0].posix_acl && !c.fs[0].xattr);
        assert!(c.blk[0].readonly);
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        let e = check("[vm]\ncpus = 2\nfrobnicate = 1\n").unwrap_err();
        assert_eq!((e.line, e.column), (3, 1), "{e}");
        assert!(e.message.contains("unknown field `frobnicate`"), "{e}");
        assert!(e.to_string().starts_with("vm.toml:3:1: "));

        let e = check("[vm]\nkernel = \"/nonexistent/vmlinuz\"\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("vm.kernel") && e.message.contains("/nonexistent/vmlinuz"));

        let e = check("[vm]\n[[fs]]\nshared_dir = \"/nonexistent\"\ntag = \"a\"\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.message.contains("fs[0].shared_dir"), "{e}");

        let e = check("[vm]\n[[fs]]\nshared_dir = \"/\"\ntag = \"a\"\n[[fs]]\nshared_dir = \"/tmp\"\ntag = \"a\"\n")
            .unwrap_err();
        assert_eq!(e.line, 7);
        assert!(e.message.contains("already used"), "{e}");

        let e = check("[vm]\nmemory = \"lots\"\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("vm.memory"));

        let e = check("[vm]\nvmm = \"bochs\"\n").unwrap_err();
        assert_eq!(e.line, 2);

        // More huge pages than any host here has: refused, saying how many.
        let e = check("[vm]\nmemory = \"512G\"\nhugepages = true\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(
            e.message.contains("vm.hugepages") && e.message.contains("262144"),
            "{e}"
        );

        let e = check("[[fs]]\nshared_dir = \"/\"\ntag = \"a\"\n").unwrap_err();
        assert!(e.message.contains("missing field `vm`"), "{e}");
        let e = check("[vm]\n[[fs]]\ntag = \"a\"\n").unwrap_err();
        assert!(e.message.contains("missing field `shared_dir`"), "{e}");
    }

    #[test]
    fn nics() {
        let c = check("[vm]\nname = \"n\"\n[[net]]\ntap = \"tap7\"\nmac = \"52:54:00:00:00:07\"\n[[net]]\nsocket = \"/run/peer.sock\"\n")
            .unwrap();
        assert_eq!(c.net[0].link, NetLink::Tap("tap7".into()));
        assert_eq!(c.net[0].mac, "52:54:00:00:00:07");
        assert_eq!(c.net[1].link, NetLink::Socket("/run/peer.sock".into()));
        let c =
            check("[vm]\n[[net]]\nlisten = \"/run/j.sock\"\n[[net]]\ntap = \"t\"\nqueues = 4\n")
                .unwrap();
        assert_eq!(c.net[0].link, NetLink::Listen("/run/j.sock".into()));
        assert_eq!((c.net[0].queues, c.net[1].queues), (1, 4));
        let e = check("[vm]\n[[net]]\nsocket = \"/a\"\nqueues = 2\n").unwrap_err();
        assert!(e.message.contains("needs a tap"), "{e}");
        let e = check("[vm]\n[[net]]\nqueues = 17\n").unwrap_err();
        assert!(e.message.contains("1 to 16"), "{e}");
        let e = check("[vm]\n[[net]]\ntap = \"a\"\nsocket = \"/b\"\n").unwrap_err();
        assert!(
            e.message.contains("one of tap, socket, listen or user"),
            "{e}"
        );
        let e = check("[vm]\n[[net]]\nmac = \"nope\"\n").unwrap_err();
        assert!(e.message.contains("net[0].mac"), "{e}");

        let c = check(
            "[vm]\n[[net]]\nuser = true\ntcp_forward = [\"8080:80\", \"9000-9002\"]\n\
             udp_forward = [\"5353:53\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.net[0].link,
            NetLink::User {
                tcp_forward: vec!["8080:80".into(), "9000-9002".into()],
                udp_forward: vec!["5353:53".into()],
            }
        );
        for key in ["tcp_forward", "udp_forward"] {
            for bad in [
                "0",
                "80:",
                "x",
                "10-5",
                "8000-8002:80-81",
                "70000",
                "53/udp",
            ] {
                let e = check(&format!(
                    "[vm]\n[[net]]\nuser = true\n{key} = [\"{bad}\"]\n"
                ))
                .unwrap_err();
                assert!(e.message.contains(key), "{bad}: {e}");
            }
            let e = check(&format!("[vm]\n[[net]]\ntap = \"a\"\n{key} = [\"53\"]\n")).unwrap_err();
            assert!(
                e.message
                    .contains(&format!("{key}: only for a user-mode NIC")),
                "{e}"
            );
        }
        let e = check("[vm]\n[[net]]\ntap = \"a\"\nuser = true\n").unwrap_err();
        assert!(e.message.contains("not several"), "{e}");
        let e = check("[vm]\n[[net]]\ntap = \"a\"\ntcp_forward = [\"22\"]\n").unwrap_err();
        assert!(e.message.contains("user = true"), "{e}");
        let mut c = check("[vm]\n[[net]]\ntap = \"a\"\n[[net]]\nuser = true\n").unwrap();
        let ports = [
            "8080:80",
            "5353:53/udp",
            "9000/tcp",
            "7000-7001:8000-8001/udp",
        ];
        publish(&mut c, &ports.map(String::from)).unwrap();
        assert_eq!(
            c.net[1].link,
            NetLink::User {
                tcp_forward: vec!["8080:80".into(), "9000".into()],
                udp_forward: vec!["5353:53".into(), "7000-7001:8000-8001".into()],
            }
        );
        for bad in ["80:", "53/sctp", "53/", "/udp", "53/udp/tcp"] {
            let e = publish(&mut c, &[bad.into()]).unwrap_err();
            assert!(e.contains(&format!("--publish {bad}:")), "{e}");
        }
        let mut c = check("[vm]\nname = \"t\"\n[[net]]\ntap = \"a\"\n").unwrap();
        let e = publish(&mut c, &["22".into()]).unwrap_err();
        assert!(e.contains("VM `t` has none"), "{e}");
        publish(&mut c, &[]).unwrap();
    }

    #[test]
    fn sizes() {
        assert_eq!(memory_mib(&Memory::Mib(512)), Some(512));
        assert_eq!(memory_mib(&Memory::Text("1G".into())), Some(1024));
        assert_eq!(memory_mib(&Memory::Text("768M".into())), Some(768));
        assert_eq!(memory_mib(&Memory::Text("1".into())), None);
        assert_eq!(memory_mib(&Memory::Mib(1)), None);
    }
}
