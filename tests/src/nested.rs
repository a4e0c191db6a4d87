//! The nested AMD-V test bed: where vmm-core runs real Linux guests on
//! machines without VT-x/AMD-V.
//!
//! QEMU's TCG emulates AMD-V with nested paging (`-cpu max`). So an outer
//! guest under TCG, whose script loads `irqbypass`, `kvm` and `kvm-amd` (all
//! in the host's `linux-image-cloud-amd64`), has a real `/dev/kvm`; inside
//! it vmm-core (and QEMU with `-enable-kvm`, for comparisons) boots the
//! inner guest: the same kernel and busybox initramfs the QEMU bed uses.
//!
//! The outer guest is the project's guest image with, added: the kvm
//! modules (`/nested/*.ko`), the workspace's programs (`/nested/bin`, with
//! the shared libraries `ldd` names in `/nested/lib` and the ELF
//! interpreter where they name it, so they run as on the host and find each
//! other beside themselves), the inner kernel
//! (`/nested/vmlinuz`) and inner initramfs (`/nested/inner.cpio`, the guest
//! image with the inner script as `/test.sh`). Its init copies itself onto
//! a tmpfs first (`testbed.tmpfsroot`), since the backends' sandboxes need
//! `pivot_root`, which the initramfs root does not allow.
//!
//! The inner console is the outer script's output with each line prefixed
//! `inner| ` and the test-bed markers renamed, so the outer run's exit code
//! is the outer script's. [`INNER`] runs vmm-core on the inner guest and
//! leaves its exit status in `/tmp/vmm.rc`.
//!
//! Everything comes from the host's Debian packages and the workspace's
//! build; nothing is downloaded. Times inside are emulation times: compare
//! VMMs only as ratios within one outer run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use orchestrator::image::{self, ExtraFile};
use orchestrator::qemu::{Accel, GuestError, GuestRun, Qemu};

/// What the outer guest's script starts with: load KVM for AMD-V, and stop
/// with exit code 90 where that gives no /dev/kvm.
pub const PRELUDE: &str = "for m in irqbypass kvm kvm-amd tun; do insmod /nested/$m.ko || echo \"nested: insmod $m failed\"; done; \
    [ -c /dev/kvm ] || { echo 'nested: no /dev/kvm in the outer guest'; dmesg | tail -20; exit 90; }; \
    export PATH=/nested/bin:$PATH LD_LIBRARY_PATH=/nested/lib; ";

/// A shell function for the outer script: `inner ARGS...` runs vmm-core on
/// the inner kernel and initramfs (2 vCPUs, 256 MiB unless ARGS say
/// otherwise), its console prefixed `inner| `, and leaves its exit status
/// in /tmp/vmm.rc.
pub const INNER: &str =
    "inner() { { vmm-core --kernel /nested/vmlinuz --initramfs /nested/inner.cpio \
    --cpus 2 --memory 256M --serial stdio \"$@\" 2>&1; echo $? > /tmp/vmm.rc; } \
    | sed -e 's/^/inner| /' -e 's/TESTBED-/TESTBED.INNER-/g'; }; ";

/// The modules that give the outer guest /dev/kvm, in load order, and
/// taps (`tun`, which the prelude loads too).
const KVM_MODULES: [&str; 4] = [
    "virt/lib/irqbypass.ko",
    "arch/x86/kvm/kvm.ko",
    "arch/x86/kvm/kvm-amd.ko",
    "drivers/net/tun.ko",
];

/// The nested bed, ready to run outer scripts.
pub struct Bed {
    outer: Qemu,
    /// Directories made in the outer guest's initramfs so far.
    dirs: Vec<String>,
}

/// Where the workspace's programs are: beside the running test binary's
/// directory (`target/<profile>/deps/..`).
pub fn built_program(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?;
    if dir.ends_with("deps") {
        dir = dir.parent()?;
    }
    let p = dir.join(name);
    p.is_file().then_some(p)
}

impl Bed {
    /// The bed with `programs` (workspace binaries, by name) in the outer
    /// guest and `inner_script` as the inner guest's /test.sh. Err says
    /// what is missing.
    pub fn new(programs: &[&str], inner_script: &str) -> Result<Bed, String> {
        let cfg = orchestrator::qemu::default_image_config();
        Self::with_inner_image(&cfg, programs, inner_script)
    }

    /// [`Bed::new`], with the inner guest's kernel and initramfs built by
    /// `inner` (the outer guest keeps the host's kernel, whose kvm modules
    /// it loads).
    pub fn with_inner_image(
        inner: &image::ImageConfig,
        programs: &[&str],
        inner_script: &str,
    ) -> Result<Bed, String> {
        orchestrator::qemu::qemu_available()?;
        let host = orchestrator::qemu::default_image_config();
        let outer_img = image::build(&host).map_err(|e| e.to_string())?;
        let img = image::build(inner).map_err(|e| e.to_string())?;
        let modules = PathBuf::from("/lib/modules")
            .join(&outer_img.kernel_version)
            .join("kernel");
        let mut extra = vec![dir("nested"), dir("nested/bin")];
        for m in KVM_MODULES {
            let path = modules.join(m);
            let data = std::fs::read(&path).map_err(|e| {
                format!(
                    "{}: {e} (the kvm modules come with linux-image-cloud-amd64)",
                    path.display()
                )
            })?;
            let name = Path::new(m).file_name().unwrap().to_string_lossy();
            extra.push(file(&format!("nested/{name}"), 0o644, data));
        }
        let mut libs = Vec::new();
        for p in programs {
            let path = built_program(p)
                .ok_or_else(|| format!("{p} is not built (cargo build --workspace)"))?;
            let data = std::fs::read(&path).map_err(|e| e.to_string())?;
            extra.push(file(&format!("nested/bin/{p}"), 0o755, data));
            for l in shared_libraries(&path)? {
                if !libs.contains(&l) {
                    libs.push(l);
                }
            }
        }
        extra.push(dir("nested/lib"));
        for l in libs {
            let data = std::fs::read(&l).map_err(|e| format!("{}: {e}", l.display()))?;
            let name = l
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            // The ELF interpreter must be where the programs name it; the
            // rest stays out of the standard paths, where the static
            // busybox's resolver would load the host's glibc and crash.
            let rel = if name.starts_with("ld-linux") {
                l.strip_prefix("/")
                    .unwrap_or(&l)
                    .to_string_lossy()
                    .into_owned()
            } else {
                format!("nested/lib/{name}")
            };
            for d in parents(&rel) {
                if !extra.iter().any(|e| e.path == d) {
                    extra.push(dir(&d));
                }
            }
            extra.push(file(&rel, 0o755, data));
        }
        let kernel = std::fs::read(&img.kernel).map_err(|e| e.to_string())?;
        extra.push(file("nested/vmlinuz", 0o644, kernel));
        let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
        let inner = scratch.path().join("inner.cpio");
        img.write_initrd(inner_script, &inner)
            .map_err(|e| e.to_string())?;
        let inner = std::fs::read(&inner).map_err(|e| e.to_string())?;
        extra.push(file("nested/inner.cpio", 0o644, inner));
        let mut outer = Qemu::new()
            .accel(Accel::Tcg)
            .cpus(2)
            .memory_mib(2048)
            .kernel_arg("testbed.tmpfsroot")
            .extra_arg("-cpu")
            .extra_arg("max");
        let dirs = extra
            .iter()
            .filter(|e| e.dir)
            .map(|e| e.path.clone())
            .collect();
        for e in extra {
            outer = outer.extra_file(e);
        }
        Ok(Bed { outer, dirs })
    }

    /// Also put into the outer guest what the orchestrator builds its
    /// guest image from, where Debian has it (the kernel in /boot, the
    /// modules it packs under /lib/modules, /usr/bin/busybox), so
    /// `orchestrator run` works there as on the host.
    pub fn with_image_inputs(mut self) -> Result<Bed, String> {
        let cfg = orchestrator::qemu::default_image_config();
        let (kernel, _version, modules) = image::build_inputs(&cfg).map_err(|e| e.to_string())?;
        let mut files = vec![kernel, cfg.busybox.clone()];
        files.extend(modules);
        for f in files {
            let data = std::fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?;
            let rel = f
                .strip_prefix("/")
                .unwrap_or(&f)
                .to_string_lossy()
                .into_owned();
            for d in parents(&rel) {
                if !self.dirs.contains(&d) {
                    self.outer = self.outer.extra_file(dir(&d));
                    self.dirs.push(d);
                }
            }
            self.outer = self.outer.extra_file(file(&rel, 0o755, data));
        }
        Ok(self)
    }

    /// Also put QEMU into the outer guest (`/nested/bin/qemu-system-x86_64`
    /// with its libraries, its firmware in `/nested/qemu` for `-L`), so
    /// vmm-core and QEMU with KVM can be compared there side by side.
    pub fn with_qemu(mut self) -> Result<Bed, String> {
        let qemu = orchestrator::qemu::qemu_binary()
            .filter(|q| q.is_file())
            .ok_or("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")?;
        let data = std::fs::read(&qemu).map_err(|e| e.to_string())?;
        self.outer = self
            .outer
            .extra_file(file("nested/bin/qemu-system-x86_64", 0o755, data));
        for l in shared_libraries(&qemu)? {
            let name = l
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if name.starts_with("ld-linux") {
                continue;
            }
            let data = std::fs::read(&l).map_err(|e| format!("{}: {e}", l.display()))?;
            self.outer = self
                .outer
                .extra_file(file(&format!("nested/lib/{name}"), 0o755, data));
        }
        self.outer = self.outer.extra_file(dir("nested/qemu"));
        for (name, from) in [
            ("bios-microvm.bin", "/usr/share/qemu/bios-microvm.bin"),
            ("bios-256k.bin", "/usr/share/seabios/bios-256k.bin"),
            ("kvmvapic.bin", "/usr/share/qemu/kvmvapic.bin"),
            ("linuxboot.bin", "/usr/share/qemu/linuxboot.bin"),
            ("linuxboot_dma.bin", "/usr/share/qemu/linuxboot_dma.bin"),
            ("pvh.bin", "/usr/share/qemu/pvh.bin"),
        ] {
            // Symbolic links (bios-microvm.bin is qboot.rom) are followed.
            let data = std::fs::read(from).map_err(|e| format!("{from}: {e}"))?;
            self.outer = self
                .outer
                .extra_file(file(&format!("nested/qemu/{name}"), 0o644, data));
        }
        Ok(self)
    }

    /// Run `script` in the outer guest after [`PRELUDE`] and [`INNER`].
    pub fn run(&self, script: &str, timeout: Duration) -> Result<GuestRun, GuestError> {
        self.outer
            .run(&format!("{PRELUDE}{INNER}{script}"), timeout)
    }
}

/// The lines of `run` that the inner guest printed (its console), without
/// their prefix.
pub fn inner_console(run: &GuestRun) -> String {
    run.serial
        .lines()
        .filter_map(|l| l.split_once("inner| ").map(|(_, rest)| rest))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The shared libraries `program` loads, per `ldd`.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, String> {
    let out = std::process::Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect())
}

/// Every parent directory of `rel` (a path without its leading '/'),
/// outermost first.
fn parents(rel: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = String::new();
    let parts: Vec<&str> = rel.split('/').collect();
    for p in &parts[..parts.len().saturating_sub(1)] {
        if !at.is_empty() {
            at.push('/');
        }
        at.push_str(p);
        out.push(at.clone());
    }
    out
}

fn dir(path: &str) -> ExtraFile {
    ExtraFile {
        path: path.into(),
        mode: 0o755,
        data: Vec::new(),
        dir: true,
    }
}

fn file(path: &str, mode: u32, data: Vec<u8>) -> ExtraFile {
    ExtraFile {
        path: path.into(),
        mode,
        data,
        dir: false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parents_are_listed_outermost_first() {
        assert_eq!(
            super::parents("lib/x86_64-linux-gnu/libc.so.6"),
            ["lib", "lib/x86_64-linux-gnu"]
        );
        assert!(super::parents("lib64").is_empty());
    }
}
