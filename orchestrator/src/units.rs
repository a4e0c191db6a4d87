//! systemd units for a VM: a socket and a service per backend, a service
//! for the VMM, and a target that groups them.
//!
//! - Each backend's socket is a socket unit, handed to the service as fd 3
//!   (`--fd=3`): the path outlives a backend restart, as with the
//!   orchestrator.
//! - Backends are `Type=notify` (they send READY=1 from a forked child in
//!   their sandbox, hence `NotifyAccess=all`) and `Restart=always`.
//! - The VMM wants the backends and starts after them, but is not bound to
//!   them: a backend restart does not take the VM down.
//! - A helper (passt, for a user-mode NIC) is a plain service that makes
//!   its own socket; the backend that uses it requires it, starts after it
//!   and is restarted with it (`PartOf=`), since its connection dies with
//!   the old helper. passt confines itself, so it gets no hardening here.
//! - Hardening fitted to each device: no new privileges, a read-only
//!   system, only Unix sockets, and only the capabilities its own sandbox
//!   needs to set itself up (then it drops them).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::VmConfig;
use crate::supervisor::DeviceSpec;

/// One generated file.
#[derive(Debug, Clone)]
pub struct Unit {
    pub name: String,
    pub text: String,
}

/// Quote one ExecStart word for systemd: `$` and `%` are specifiers there.
fn quote(word: &str) -> String {
    let escaped = word
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('%', "%%")
        .replace('$', "$$");
    if escaped.is_empty() || escaped.contains(|c: char| c.is_whitespace() || c == ';') {
        format!("\"{escaped}\"")
    } else {
        escaped
    }
}

fn exec(words: &[String]) -> String {
    words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
}

/// Capabilities each backend needs at start (its sandbox drops them).
fn capabilities(device: &str) -> &'static str {
    if device.starts_with("net") {
        // Opening (or creating) its tap, before the sandbox drops it.
        "CAP_SYS_ADMIN CAP_SETPCAP CAP_NET_ADMIN"
    } else if device.starts_with("fs") {
        // Namespaces and pivot_root, then what a passthrough filesystem
        // keeps: acting for any guest user.
        "CAP_SYS_ADMIN CAP_SETPCAP CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER \
         CAP_FSETID CAP_SETGID CAP_SETUID CAP_MKNOD CAP_SETFCAP"
    } else {
        "CAP_SYS_ADMIN CAP_SETPCAP"
    }
}

/// The units of VM `cfg`, whose sockets live in `run_dir`; `vmm` is the
/// VMM's full command line; with `relayed` (QEMU) each backend gets a relay
/// service the VMM talks to instead.
pub fn systemd(
    cfg: &VmConfig,
    specs: &[DeviceSpec],
    run_dir: &Path,
    vmm: &[String],
    relayed: bool,
) -> Vec<Unit> {
    let vm = &cfg.name;
    let target = format!("vmm-{vm}.target");
    let mut units = Vec::new();
    let mut services = Vec::new();
    for spec in specs {
        let dev = &spec.name;
        let base = format!("vmm-{vm}-{dev}");
        if spec.ready_path.is_some() {
            let mut words = vec![spec.program.display().to_string()];
            words.extend(spec.args.iter().cloned());
            units.push(Unit {
                name: format!("{base}.service"),
                text: format!(
                    "[Unit]\nDescription=vmm {vm}: {dev} ({})\nPartOf={target}\n\n\
                     [Service]\nType=simple\nExecStart={}\nRestart=always\nRestartSec=100ms\n\n\
                     [Install]\nWantedBy={target}\n",
                    spec.program
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    exec(&words),
                ),
            });
            services.push(format!("{base}.service"));
            continue;
        }
        let socket = run_dir.join(format!("{dev}.sock"));
        units.push(Unit {
            name: format!("{base}.socket"),
            text: format!(
                "[Unit]\nDescription=vmm {vm}: {dev} socket\nPartOf={target}\n\n\
                 [Socket]\nListenStream={}\nSocketMode=0600\nService={base}.service\n\n\
                 [Install]\nWantedBy={target}\n",
                socket.display()
            ),
        });
        let writable: Vec<PathBuf> = spec
            .args
            .iter()
            .filter_map(|a| {
                a.strip_prefix("--shared-dir=")
                    .or_else(|| a.strip_prefix("--image="))
                    .map(PathBuf::from)
            })
            .collect();
        let readonly = spec.args.iter().any(|a| a == "--readonly");
        // A share's session file, which the backend writes as it serves.
        let state_files: Vec<PathBuf> = spec
            .args
            .iter()
            .filter_map(|a| a.strip_prefix("--state-file=").map(PathBuf::from))
            .collect();
        let mut s = String::new();
        // The helper it talks to, if any.
        let helper = spec
            .follows
            .as_ref()
            .map(|h| {
                let h = format!("vmm-{vm}-{h}.service");
                format!("Requires={h}\nAfter={h}\nPartOf={h}\n")
            })
            .unwrap_or_default();
        let _ = write!(
            s,
            "[Unit]\nDescription=vmm {vm}: {dev} backend\nPartOf={target}\n{helper}\
             Requires={base}.socket\nAfter={base}.socket\n\n\
             [Service]\nType=notify\nNotifyAccess=all\nExecStart={}\n\
             Restart=always\nRestartSec=100ms\n\
             NoNewPrivileges=yes\nProtectSystem=strict\nPrivateTmp=yes\nProtectHome=read-only\n\
             ProtectKernelTunables=yes\nProtectKernelModules=yes\nProtectControlGroups=yes\n\
             ProtectClock=yes\nProtectHostname=yes\nLockPersonality=yes\nRestrictRealtime=yes\n\
             RestrictSUIDSGID=yes\nSystemCallArchitectures=native\n\
             RestrictAddressFamilies=AF_UNIX\nCapabilityBoundingSet={}\n",
            exec(&{
                let mut w = vec![spec.program.display().to_string()];
                w.extend(spec.args.iter().map(|a| {
                    match (&spec.open_tap, a.starts_with("--tap-fd=")) {
                        // systemd cannot hand over a tap: the backend opens it.
                        (Some((t, _)), true) => format!("--tap={t}"),
                        _ => a.clone(),
                    }
                }));
                w.push("--fd=3".into());
                w
            }),
            capabilities(dev),
        );
        for w in &writable {
            let key = if readonly {
                "ReadOnlyPaths"
            } else {
                "ReadWritePaths"
            };
            let _ = writeln!(s, "{key}={}", quote(&w.display().to_string()));
        }
        for f in state_files.iter().filter_map(|f| f.parent()) {
            let _ = writeln!(s, "ReadWritePaths={}", quote(&f.display().to_string()));
        }
        let _ = write!(s, "\n[Install]\nWantedBy={target}\n");
        units.push(Unit {
            name: format!("{base}.service"),
            text: s,
        });
        services.push(format!("{base}.service"));
        if relayed {
            // QEMU 7.2 cannot reconnect vhost-user-fs, and reconnects disks
            // and NICs once a second: it reaches each backend through a
            // relay that outlives the backend's restarts.
            let relay = format!("{base}-relay");
            let front = run_dir.join(format!("{dev}.vmm.sock"));
            let me = std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "orchestrator".into());
            units.push(Unit {
                name: format!("{relay}.socket"),
                text: format!(
                    "[Unit]\nDescription=vmm {vm}: {dev} relay socket\nPartOf={target}\n\n\
                     [Socket]\nListenStream={}\nSocketMode=0600\nService={relay}.service\n\n\
                     [Install]\nWantedBy={target}\n",
                    front.display()
                ),
            });
            units.push(Unit {
                name: format!("{relay}.service"),
                text: format!(
                    "[Unit]\nDescription=vmm {vm}: {dev} vhost-user relay\nPartOf={target}\n\
                     Requires={relay}.socket\nAfter={relay}.socket {base}.socket\n\
                     Wants={base}.socket\n\n\
                     [Service]\nType=simple\nExecStart={}\nRestart=always\n\
                     NoNewPrivileges=yes\nProtectSystem=strict\nPrivateTmp=yes\n\
                     ProtectHome=read-only\nRestrictAddressFamilies=AF_UNIX\n\
                     CapabilityBoundingSet=\n\n\
                     [Install]\nWantedBy={target}\n",
                    exec(&[
                        me,
                        "relay".into(),
                        "--fd=3".into(),
                        format!("--backend={}", socket.display()),
                        format!("--device={dev}"),
                    ]),
                ),
            });
            services.push(format!("{relay}.service"));
        }
    }
    let vmm_unit = format!("vmm-{vm}-vmm.service");
    units.push(Unit {
        name: vmm_unit.clone(),
        text: format!(
            "[Unit]\nDescription=vmm {vm}: the VMM\nPartOf={target}\n\
             Wants={services}\nAfter={services}\n\n\
             [Service]\nType=simple\nExecStart={}\nRestart=on-failure\n\
             NoNewPrivileges=yes\nProtectSystem=strict\nPrivateTmp=yes\nProtectHome=read-only\n\
             RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n\n\
             [Install]\nWantedBy={target}\n",
            exec(vmm),
            services = services.join(" "),
        ),
    });
    units.push(Unit {
        name: target.clone(),
        text: format!(
            "[Unit]\nDescription=vmm {vm}: devices and VMM\nWants={} {vmm_unit}\n\n\
             [Install]\nWantedBy=multi-user.target\n",
            services.join(" ")
        ),
    });
    units
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("plain"), "plain");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("100%"), "100%%");
        assert_eq!(quote("$HOME"), "$$HOME");
        assert_eq!(quote(""), "\"\"");
    }
}

/// Escape text for a plist `<string>`.
fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// launchd property lists for VM `cfg`: one job per backend (each binds
/// its own socket under `run_dir`, as launchd has no `--fd` hand-over) and
/// one for the VMM. `KeepAlive` restarts a backend that dies.
pub fn launchd(
    cfg: &VmConfig,
    specs: &[DeviceSpec],
    run_dir: &Path,
    vmm: &[String],
    relayed: bool,
) -> Vec<Unit> {
    let vm = &cfg.name;
    let plist = |label: &str, args: &[String], log: &Path| {
        let mut s = String::from(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \
             \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
             <plist version=\"1.0\">\n<dict>\n",
        );
        let _ = write!(s, "  <key>Label</key>\n  <string>{}</string>\n", xml(label));
        s.push_str("  <key>ProgramArguments</key>\n  <array>\n");
        for a in args {
            let _ = writeln!(s, "    <string>{}</string>", xml(a));
        }
        s.push_str("  </array>\n  <key>RunAtLoad</key>\n  <true/>\n");
        s.push_str("  <key>KeepAlive</key>\n  <true/>\n");
        let _ = write!(
            s,
            "  <key>StandardOutPath</key>\n  <string>{0}</string>\n\
             \x20 <key>StandardErrorPath</key>\n  <string>{0}</string>\n",
            xml(&log.display().to_string())
        );
        s.push_str("</dict>\n</plist>\n");
        s
    };
    let mut units = Vec::new();
    for spec in specs {
        let label = format!("dev.vmm.{vm}.{}", spec.name);
        let mut args = vec![spec.program.display().to_string()];
        args.extend(spec.args.iter().cloned());
        if spec.ready_path.is_some() {
            // A helper: its own socket, its own confinement.
            let log = run_dir.join(format!("{}.log", spec.name));
            units.push(Unit {
                name: format!("{label}.plist"),
                text: plist(&label, &args, &log),
            });
            continue;
        }
        let socket = run_dir.join(format!("{}.sock", spec.name));
        args.push(format!("--socket-path={}", socket.display()));
        // The Linux sandbox does not exist there.
        args.push("--sandbox=none".into());
        let log = run_dir.join(format!("{}.log", spec.name));
        units.push(Unit {
            name: format!("{label}.plist"),
            text: plist(&label, &args, &log),
        });
        if !relayed {
            continue;
        }
        // QEMU reaches the backend through a relay that outlives its
        // restarts (see relay.rs).
        let me = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "orchestrator".into());
        let relay = [
            me,
            "relay".into(),
            format!(
                "--listen={}",
                run_dir.join(format!("{}.vmm.sock", spec.name)).display()
            ),
            format!("--backend={}", socket.display()),
            format!("--device={}", spec.name),
        ];
        let label = format!("dev.vmm.{vm}.{}-relay", spec.name);
        units.push(Unit {
            name: format!("{label}.plist"),
            text: plist(
                &label,
                &relay,
                &run_dir.join(format!("{}-relay.log", spec.name)),
            ),
        });
    }
    let label = format!("dev.vmm.{vm}.vmm");
    units.push(Unit {
        name: format!("{label}.plist"),
        text: plist(&label, vmm, &run_dir.join("vmm.log")),
    });
    units
}

#[cfg(test)]
mod launchd_tests {
    use super::*;

    #[test]
    fn plists_are_well_formed_with_the_required_keys() {
        let cfg = VmConfig {
            name: "mac".into(),
            kernel: None,
            initramfs: None,
            cmdline: None,
            cpus: 1,
            memory_mib: 512,
            hugepages: false,
            vmm: crate::config::VmmChoice::Qemu,
            fs: Vec::new(),
            blk: Vec::new(),
            net: Vec::new(),
        };
        let specs = [DeviceSpec {
            name: "blk0".into(),
            program: PathBuf::from("/opt/vmm/blk-backend"),
            args: vec!["--image=/tmp/a&b <disk>.img".into()],
            pass_fds: Vec::new(),
            open_tap: None,
            ..Default::default()
        }];
        let units = launchd(
            &cfg,
            &specs,
            Path::new("/tmp/vmm/mac"),
            &["qemu".into()],
            true,
        );
        // The backend, its relay, the VMM.
        assert_eq!(units.len(), 3);
        for u in &units {
            let t = &u.text;
            assert!(t.starts_with("<?xml version=\"1.0\""));
            for key in ["Label", "ProgramArguments", "KeepAlive", "RunAtLoad"] {
                assert!(t.contains(&format!("<key>{key}</key>")), "{key} in {t}");
            }
            // Every element opened is closed, in order.
            let mut stack = Vec::new();
            let mut rest = t.as_str();
            while let Some(i) = rest.find('<') {
                let j = rest[i..].find('>').expect("tag closes") + i;
                let tag = &rest[i + 1..j];
                rest = &rest[j + 1..];
                if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
                    continue;
                }
                if let Some(name) = tag.strip_prefix('/') {
                    assert_eq!(stack.pop(), Some(name.to_string()), "in {t}");
                } else {
                    stack.push(tag.split_whitespace().next().unwrap().to_string());
                }
            }
            assert!(stack.is_empty(), "unclosed {stack:?}");
        }
        let blk = &units[0].text;
        assert!(blk.contains("<string>--image=/tmp/a&amp;b &lt;disk&gt;.img</string>"));
        assert!(blk.contains("--socket-path=/tmp/vmm/mac/blk0.sock"));
        let relay = &units[1].text;
        assert!(relay.contains("<string>--listen=/tmp/vmm/mac/blk0.vmm.sock</string>"));
        assert!(relay.contains("<string>--backend=/tmp/vmm/mac/blk0.sock</string>"));
    }
}
