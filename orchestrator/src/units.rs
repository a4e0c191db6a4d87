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
    if device.starts_with("fs") {
        // Namespaces and pivot_root, then what a passthrough filesystem
        // keeps: acting for any guest user.
        "CAP_SYS_ADMIN CAP_SETPCAP CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER \
         CAP_FSETID CAP_SETGID CAP_SETUID CAP_MKNOD CAP_SETFCAP"
    } else {
        "CAP_SYS_ADMIN CAP_SETPCAP"
    }
}

/// The units of VM `cfg`, whose sockets live in `run_dir`; `vmm` is the
/// VMM's full command line.
pub fn systemd(cfg: &VmConfig, specs: &[DeviceSpec], run_dir: &Path, vmm: &[String]) -> Vec<Unit> {
    let vm = &cfg.name;
    let target = format!("vmm-{vm}.target");
    let mut units = Vec::new();
    let mut services = Vec::new();
    for spec in specs {
        let dev = &spec.name;
        let base = format!("vmm-{vm}-{dev}");
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
        let mut s = String::new();
        let _ = write!(
            s,
            "[Unit]\nDescription=vmm {vm}: {dev} backend\nPartOf={target}\n\
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
                w.extend(spec.args.iter().cloned());
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
        let _ = write!(s, "\n[Install]\nWantedBy={target}\n");
        units.push(Unit {
            name: format!("{base}.service"),
            text: s,
        });
        services.push(format!("{base}.service"));
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
