//! The default guest image: Debian's cloud kernel plus a busybox initramfs built here.
//!
//! Everything comes from Debian packages already on the host (`linux-image-cloud-amd64`,
//! `busybox-static`); nothing is downloaded. The base initramfs is cached in an output directory
//! next to a stamp of its inputs, and a per-test `/test.sh` is appended as a second cpio archive
//! (the kernel unpacks concatenated archives in order), so tests never rebuild the base.

mod busybox;
pub mod cpio;
mod init;
mod modules;

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use sha2::{Digest, Sha256};
use thiserror::Error;

use busybox::{busybox_applets, check_static_elf};
use cpio::CpioWriter;
use init::init_script;
use modules::{index_modules, normalize_module, read_module};

/// Bump when the layout of the initramfs or the init script changes in a way the stamp of the
/// inputs would not notice (for example a change to this file's packing logic).
pub const FORMAT_VERSION: u32 = 1;

/// Modules the guest needs for virtio-pci, virtio-fs, virtio-blk and virtio-net, in an order
/// that satisfies their dependencies (busybox `insmod` does not resolve them).
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
    "fuse",
    "virtiofs",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
];

/// Printed on the console by `/init` right before it runs `/test.sh`.
pub const START_MARKER: &str = "TESTBED-START";
/// Printed on the console by `/init` after `/test.sh`, followed by its exit code.
pub const EXIT_MARKER: &str = "TESTBED-EXIT=";

/// File names inside the output directory.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The base initramfs, without any test script.
pub const INITRAMFS_FILE: &str = "initramfs.cpio";
const STAMP_FILE: &str = "stamp";

const INSTALL_HINT: &str = "apt-get install linux-image-cloud-amd64 busybox-static";

/// Everything that can go wrong while building or extending the guest image.
#[derive(Debug, Error)]
pub enum ImageError {
    /// No kernel to boot.
    #[error("no *-cloud-amd64 kernel in {dir}; install one with `{INSTALL_HINT}`")]
    NoKernel {
        /// Where we looked.
        dir: PathBuf,
        /// Why the directory could not be listed, if it could not.
        #[source]
        source: Option<io::Error>,
    },
    /// A kernel path was given without a version, and the file name does not carry one.
    #[error(
        "cannot tell the kernel version from {0} (expected vmlinuz-<version>); pass the version"
    )]
    KernelVersion(PathBuf),
    /// The kernel file is unreadable.
    #[error("cannot read kernel {path}; install it with `{INSTALL_HINT}`")]
    Kernel {
        /// The kernel image.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The modules directory of the chosen kernel could not be walked.
    #[error("cannot list kernel modules under {dir}; install them with `{INSTALL_HINT}`")]
    ModulesDir {
        /// The directory walked.
        dir: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A module in the load order is not shipped with this kernel.
    #[error("kernel module {name} not found under {dir}; the kernel needs its modules: `{INSTALL_HINT}`")]
    ModuleMissing {
        /// The module name.
        name: String,
        /// The directory searched.
        dir: PathBuf,
    },
    /// A module file could not be read.
    #[error("cannot read kernel module {path}")]
    ModuleRead {
        /// The module file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A compressed module needs a tool that is not installed.
    #[error(
        "cannot run `{tool}` to decompress {path}; install it with `apt-get install {package}`"
    )]
    Decompressor {
        /// The compressed module.
        path: PathBuf,
        /// The tool.
        tool: &'static str,
        /// The Debian package providing it.
        package: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The decompressor ran but failed.
    #[error("`{tool}` failed to decompress {path}: {stderr}")]
    DecompressFailed {
        /// The compressed module.
        path: PathBuf,
        /// The tool.
        tool: &'static str,
        /// What it said.
        stderr: String,
    },
    /// busybox is missing or unreadable.
    #[error("cannot read busybox at {path}; install it with `apt-get install busybox-static`")]
    Busybox {
        /// Where it was expected.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// busybox is not a static x86-64 ELF, so it cannot run in an initramfs without a libc.
    #[error("{path} is not a static x86-64 executable ({why}); the initramfs has no libc: `apt-get install busybox-static`")]
    BusyboxNotStatic {
        /// The binary.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `busybox --list` failed.
    #[error("cannot list the applets of {path} (`busybox --list`)")]
    BusyboxList {
        /// The binary.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A member does not fit in the cpio format.
    #[error(transparent)]
    Cpio(#[from] cpio::TooLarge),
    /// The output could not be written.
    #[error("cannot write {path}")]
    Output {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, ImageError>;

/// What to build and where.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// Where the kernel, the initramfs and the stamp go.
    pub out_dir: PathBuf,
    /// A kernel image to use instead of the newest `*-cloud-amd64` in `boot_dir`.
    pub kernel: Option<PathBuf>,
    /// The kernel version (names `vmlinuz-<v>` and `/lib/modules/<v>`); guessed when absent.
    pub kernel_version: Option<String>,
    /// Where Debian installs kernels.
    pub boot_dir: PathBuf,
    /// Where Debian installs modules, one directory per kernel version.
    pub modules_root: PathBuf,
    /// A statically linked busybox.
    pub busybox: PathBuf,
    /// Modules to pack and load, in load order.
    pub modules: Vec<String>,
    /// Print progress lines on stderr.
    pub progress: bool,
}

impl ImageConfig {
    /// The default image (Debian's paths, [`DEFAULT_MODULES`]) built into `out_dir`.
    pub fn new(out_dir: impl Into<PathBuf>) -> Self {
        Self {
            out_dir: out_dir.into(),
            kernel: None,
            kernel_version: None,
            boot_dir: PathBuf::from("/boot"),
            modules_root: PathBuf::from("/lib/modules"),
            busybox: PathBuf::from("/usr/bin/busybox"),
            modules: DEFAULT_MODULES.iter().map(|m| (*m).to_owned()).collect(),
            progress: true,
        }
    }
}

/// The default cache directory: `<workspace>/.cache/guest` when run inside the Cargo workspace
/// (it is git-ignored there), else `$XDG_CACHE_HOME/vmm-testbed/guest` or `~/.cache/...`.
pub fn default_out_dir() -> PathBuf {
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let manifest = fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
            if manifest.lines().any(|l| l.trim() == "[workspace]") {
                return dir.join(".cache/guest");
            }
        }
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("vmm-testbed/guest")
}

/// The files an image build of `cfg` reads: the kernel, its version, and
/// each module it packs (for a machine that builds the image itself, such
/// as the nested test bed's outer guest).
pub fn build_inputs(cfg: &ImageConfig) -> Result<(PathBuf, String, Vec<PathBuf>)> {
    let inputs = Inputs::resolve(cfg)?;
    Ok((
        inputs.kernel,
        inputs.version,
        inputs.modules.into_iter().map(|(_, p)| p).collect(),
    ))
}

/// A built guest image, ready for `-kernel` and `-initrd`.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel, copied into the output directory.
    pub kernel: PathBuf,
    /// The base initramfs (no `/test.sh`: the guest starts a shell).
    pub initramfs: PathBuf,
    /// The version of the kernel and its modules.
    pub kernel_version: String,
    /// Whether this call rebuilt the image (false: the cache was up to date).
    pub rebuilt: bool,
}

impl GuestImage {
    /// Writes the base initramfs followed by a `/test.sh` archive to `dest`, for `-initrd`.
    pub fn write_initrd(&self, script: &str, dest: &Path) -> Result<()> {
        write_initrd(&self.initramfs, script, &[], dest)
    }

    /// Like [`GuestImage::write_initrd`], with `extra` files (guest path,
    /// mode, contents) next to the script. Their directories must exist in
    /// the base image or be listed before them with an empty path.
    pub fn write_initrd_with(&self, script: &str, extra: &[ExtraFile], dest: &Path) -> Result<()> {
        write_initrd(&self.initramfs, script, extra, dest)
    }
}

/// A file added to a test's initramfs.
#[derive(Clone, Debug)]
pub struct ExtraFile {
    /// Path inside the guest, without the leading `/`.
    pub path: String,
    pub mode: u32,
    pub data: Vec<u8>,
    /// A directory rather than a file (`data` is ignored).
    pub dir: bool,
}

/// A tiny newc archive holding `/test.sh` (mode 0755) and `extra`, to append to the base
/// initramfs.
pub fn script_archive(script: &str, extra: &[ExtraFile]) -> Result<Vec<u8>> {
    let mut w = CpioWriter::new();
    w.file("test.sh", 0o755, script.as_bytes())?;
    for f in extra {
        if f.dir {
            w.dir(&f.path, f.mode)?;
        } else {
            w.file(&f.path, f.mode, &f.data)?;
        }
    }
    Ok(w.finish())
}

/// Writes `base` followed by [`script_archive`] of `script` and `extra` into `dest`.
pub fn write_initrd(base: &Path, script: &str, extra: &[ExtraFile], dest: &Path) -> Result<()> {
    let out_err = |source| ImageError::Output {
        path: dest.to_owned(),
        source,
    };
    let mut bytes = fs::read(base).map_err(|source| ImageError::Output {
        path: base.to_owned(),
        source,
    })?;
    // Linux only finds the next archive at a 4-aligned offset; our base is block-padded, but a
    // base from elsewhere may not be.
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    bytes.extend(script_archive(script, extra)?);
    fs::write(dest, bytes).map_err(out_err)
}

/// Builds the image into `cfg.out_dir`, or returns the cached one if its inputs are unchanged.
pub fn build(cfg: &ImageConfig) -> Result<GuestImage> {
    let inputs = Inputs::resolve(cfg)?;
    let stamp = inputs.hash()?;
    let kernel = cfg.out_dir.join(KERNEL_FILE);
    let initramfs = cfg.out_dir.join(INITRAMFS_FILE);
    let stamp_path = cfg.out_dir.join(STAMP_FILE);
    let mut image = GuestImage {
        kernel: kernel.clone(),
        initramfs: initramfs.clone(),
        kernel_version: inputs.version.clone(),
        rebuilt: false,
    };
    let cached = fs::read_to_string(&stamp_path).is_ok_and(|s| s.trim() == stamp)
        && kernel.is_file()
        && initramfs.is_file();
    if cached {
        progress(
            cfg,
            format_args!("guest image up to date in {}", cfg.out_dir.display()),
        );
        return Ok(image);
    }

    fs::create_dir_all(&cfg.out_dir).map_err(|source| ImageError::Output {
        path: cfg.out_dir.clone(),
        source,
    })?;
    progress(
        cfg,
        format_args!("building guest image for kernel {}", inputs.version),
    );
    let archive = pack(cfg, &inputs)?;
    write_atomic(&initramfs, &archive)?;
    progress(
        cfg,
        format_args!("wrote {INITRAMFS_FILE} ({})", mib(archive.len() as u64)),
    );
    let kernel_bytes = fs::read(&inputs.kernel).map_err(|source| ImageError::Kernel {
        path: inputs.kernel.clone(),
        source,
    })?;
    write_atomic(&kernel, &kernel_bytes)?;
    progress(
        cfg,
        format_args!(
            "copied {} ({})",
            inputs.kernel.display(),
            mib(kernel_bytes.len() as u64)
        ),
    );
    // The stamp goes last: an interrupted build leaves a stale stamp, never a fresh one.
    write_atomic(&stamp_path, format!("{stamp}\n").as_bytes())?;
    image.rebuilt = true;
    Ok(image)
}

/// The resolved inputs of a build; their hash decides whether the cache is fresh.
#[derive(Debug, Clone)]
struct Inputs {
    kernel: PathBuf,
    version: String,
    /// (name, file) in load order.
    modules: Vec<(String, PathBuf)>,
    busybox: PathBuf,
    init: String,
}

impl Inputs {
    fn resolve(cfg: &ImageConfig) -> Result<Self> {
        let (kernel, version) = resolve_kernel(cfg)?;
        fs::metadata(&kernel).map_err(|source| ImageError::Kernel {
            path: kernel.clone(),
            source,
        })?;
        let dir = cfg.modules_root.join(&version);
        let found = index_modules(&dir)?;
        // What the kernel has built in needs no module (a newer kernel
        // builds in virtio-pci, fuse and virtiofs, say).
        let builtin = builtin_modules(&dir);
        let mut modules = Vec::new();
        for name in &cfg.modules {
            match found.get(&normalize_module(name)) {
                Some(path) => modules.push((name.clone(), path.clone())),
                None if builtin.contains(&normalize_module(name)) => {}
                None => {
                    return Err(ImageError::ModuleMissing {
                        name: name.clone(),
                        dir: dir.clone(),
                    })
                }
            }
        }
        let load: Vec<String> = modules.iter().map(|(n, _)| n.clone()).collect();
        Ok(Self {
            kernel,
            version,
            modules,
            busybox: cfg.busybox.clone(),
            init: init_script(&load),
        })
    }

    /// SHA-256 over everything that shapes the output. File contents are represented by path,
    /// size and mtime: reading 15 MB of kernel on every test run would cost more than it saves.
    fn hash(&self) -> Result<String> {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(&FORMAT_VERSION.to_le_bytes());
        field(self.version.as_bytes());
        let kernel = file_identity(&self.kernel).map_err(|source| ImageError::Kernel {
            path: self.kernel.clone(),
            source,
        })?;
        field(&kernel);
        for (name, path) in &self.modules {
            field(name.as_bytes());
            let id = file_identity(path).map_err(|source| ImageError::ModuleRead {
                path: path.clone(),
                source,
            })?;
            field(&id);
        }
        let busybox = file_identity(&self.busybox).map_err(|source| ImageError::Busybox {
            path: self.busybox.clone(),
            source,
        })?;
        field(&busybox);
        field(self.init.as_bytes());
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

fn file_identity(path: &Path) -> io::Result<Vec<u8>> {
    let md = fs::metadata(path)?;
    let mut id = path.as_os_str().as_encoded_bytes().to_vec();
    id.extend(md.size().to_le_bytes());
    id.extend(md.mtime().to_le_bytes());
    id.extend(md.mtime_nsec().to_le_bytes());
    Ok(id)
}

/// The kernel image and version `cfg` selects, without building anything: lets callers tell
/// early whether a guest can be booted at all.
pub fn resolve_kernel(cfg: &ImageConfig) -> Result<(PathBuf, String)> {
    match (&cfg.kernel, &cfg.kernel_version) {
        (Some(path), Some(version)) => Ok((path.clone(), version.clone())),
        (Some(path), None) => {
            let version = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .filter(|v| !v.is_empty())
                .ok_or_else(|| ImageError::KernelVersion(path.clone()))?;
            Ok((path.clone(), version.to_owned()))
        }
        (None, Some(version)) => Ok((
            cfg.boot_dir.join(format!("vmlinuz-{version}")),
            version.clone(),
        )),
        (None, None) => {
            let no_kernel = |source| ImageError::NoKernel {
                dir: cfg.boot_dir.clone(),
                source,
            };
            let entries = fs::read_dir(&cfg.boot_dir).map_err(|e| no_kernel(Some(e)))?;
            let version = entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter_map(|n| n.strip_prefix("vmlinuz-").map(str::to_owned))
                .filter(|v| v.ends_with("-cloud-amd64"))
                .max_by_key(|v| version_key(v))
                .ok_or_else(|| no_kernel(None))?;
            Ok((cfg.boot_dir.join(format!("vmlinuz-{version}")), version))
        }
    }
}

/// The modules the kernel of `dir` (its `/lib/modules/<version>`) has
/// built in, by normalized name, from its `modules.builtin`.
fn builtin_modules(dir: &Path) -> std::collections::HashSet<String> {
    fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            Path::new(l.trim())
                .file_name()?
                .to_str()?
                .strip_suffix(".ko")
        })
        .map(normalize_module)
        .collect()
}

/// Orders "6.1.0-9-..." before "6.1.0-56-...": numeric runs compare as numbers.
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(u64::MAX))
        .collect()
}

fn pack(cfg: &ImageConfig, inputs: &Inputs) -> Result<Vec<u8>> {
    let busybox = fs::read(&inputs.busybox).map_err(|source| ImageError::Busybox {
        path: inputs.busybox.clone(),
        source,
    })?;
    check_static_elf(&busybox).map_err(|why| ImageError::BusyboxNotStatic {
        path: inputs.busybox.clone(),
        why,
    })?;
    let applets = busybox_applets(&inputs.busybox)?;

    let mut w = CpioWriter::new();
    for dir in [
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "mnt",
        "mnt/host",
        "proc",
        "root",
        "run",
        "sys",
        "tmp",
        "usr",
    ] {
        w.dir(dir, if dir == "tmp" { 0o1777 } else { 0o755 })?;
    }
    // One directory of applets; the usual paths point at it so scripts with absolute paths work.
    for (link, target) in [
        ("sbin", "bin"),
        ("usr/bin", "../bin"),
        ("usr/sbin", "../bin"),
    ] {
        w.symlink(link, target)?;
    }
    // The kernel opens /dev/console for PID 1 before /init can mount devtmpfs.
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;
    w.file("bin/busybox", 0o755, &busybox)?;
    progress(
        cfg,
        format_args!("linking {} busybox applets...", applets.len()),
    );
    for applet in &applets {
        w.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    progress(
        cfg,
        format_args!("packing {} modules...", inputs.modules.len()),
    );
    for (name, path) in &inputs.modules {
        w.file(
            &format!("lib/modules/{}.ko", normalize_module(name)),
            0o644,
            &read_module(path)?,
        )?;
    }
    w.file("init", 0o755, inputs.init.as_bytes())?;
    Ok(w.finish())
}

fn progress(cfg: &ImageConfig, msg: std::fmt::Arguments<'_>) {
    if cfg.progress {
        eprintln!("{msg}");
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Writes through a unique temporary name and renames, so concurrent builders (parallel tests)
/// never see a half-written file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let out_err = |source| ImageError::Output {
        path: path.to_owned(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(out_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path, bytes: &[u8]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    }

    /// A fake /boot and /lib/modules with two kernels.
    fn fake_host(root: &Path) -> ImageConfig {
        for v in ["6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64"] {
            touch(&root.join(format!("boot/vmlinuz-{v}")), v.as_bytes());
            touch(
                &root.join(format!("modules/{v}/kernel/drivers/virtio/virtio.ko")),
                b"ko",
            );
            touch(
                &root.join(format!("modules/{v}/kernel/fs/fuse/virtio-fs.ko")),
                b"ko",
            );
        }
        touch(&root.join("boot/vmlinuz-6.1.0-99-amd64"), b"not cloud");
        touch(&root.join("busybox"), b"bb");
        let mut cfg = ImageConfig::new(root.join("out"));
        cfg.boot_dir = root.join("boot");
        cfg.modules_root = root.join("modules");
        cfg.busybox = root.join("busybox");
        cfg.modules = vec!["virtio".into(), "virtio_fs".into()];
        cfg.progress = false;
        cfg
    }

    #[test]
    fn picks_newest_cloud_kernel_and_finds_modules() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = fake_host(tmp.path());
        let inputs = Inputs::resolve(&cfg).unwrap();
        assert_eq!(inputs.version, "6.1.0-56-cloud-amd64");
        assert!(inputs.modules[1].1.ends_with("virtio-fs.ko"));

        let mut missing = cfg.clone();
        missing.modules.push("virtio_net".into());
        let err = Inputs::resolve(&missing).unwrap_err();
        assert!(matches!(err, ImageError::ModuleMissing { ref name, .. } if name == "virtio_net"));
        assert!(err.to_string().contains("apt-get install"));
    }

    #[test]
    fn input_hash_tracks_every_input() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = fake_host(tmp.path());
        let hash = |cfg: &ImageConfig| Inputs::resolve(cfg).unwrap().hash().unwrap();
        let base = hash(&cfg);
        assert_eq!(base, hash(&cfg), "hash must be stable");

        let mut other = cfg.clone();
        other.kernel_version = Some("6.1.0-9-cloud-amd64".into());
        assert_ne!(base, hash(&other), "kernel version");

        let mut other = cfg.clone();
        other.modules.reverse();
        assert_ne!(base, hash(&other), "module order changes the init script");

        touch(&cfg.busybox, b"a bigger busybox");
        let after_busybox = hash(&cfg);
        assert_ne!(base, after_busybox, "busybox size");

        let module = tmp
            .path()
            .join("modules/6.1.0-56-cloud-amd64/kernel/drivers/virtio/virtio.ko");
        touch(&module, b"KO");
        let f = fs::File::options().write(true).open(&module).unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        assert_ne!(after_busybox, hash(&cfg), "module mtime");
    }

    #[test]
    fn kernel_override_needs_a_version() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = fake_host(tmp.path());
        cfg.kernel = Some(tmp.path().join("bzImage"));
        assert!(matches!(
            resolve_kernel(&cfg),
            Err(ImageError::KernelVersion(_))
        ));
        cfg.kernel = Some(tmp.path().join("boot/vmlinuz-6.1.0-9-cloud-amd64"));
        assert_eq!(resolve_kernel(&cfg).unwrap().1, "6.1.0-9-cloud-amd64");
    }

    #[test]
    fn script_archive_holds_an_executable_test_sh() {
        let archive = script_archive("echo hi\n", &[]).unwrap();
        let members = cpio::tests::parse(&archive).unwrap();
        assert_eq!(members[0].name, "test.sh");
        assert_eq!(members[0].mode & 0o7777, 0o755);
        assert_eq!(members[0].data, b"echo hi\n");
    }

    #[test]
    fn initrd_is_base_then_script() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base.cpio");
        let mut w = CpioWriter::new();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        fs::write(&base, w.finish()).unwrap();
        let dest = tmp.path().join("initrd");
        write_initrd(&base, "true\n", &[], &dest).unwrap();
        let names: Vec<_> = cpio::tests::parse(&fs::read(dest).unwrap())
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["init", cpio::TRAILER, "test.sh", cpio::TRAILER]);
    }
}
