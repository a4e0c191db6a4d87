//! `orchestrator units --systemd`: the generated units pass
//! `systemd-analyze verify` and say what the design needs.

use std::path::Path;
use std::process::Command;

const ORCH: &str = env!("CARGO_BIN_EXE_orchestrator");

/// passt, under the rule of `require`.
fn tests_passt() -> Option<std::path::PathBuf> {
    let p = orchestrator::find_program("passt");
    require(
        p.as_ref()
            .map(drop)
            .ok_or_else(|| "passt not found (apt-get install passt)".to_string()),
    )
    .then_some(())?;
    p
}

fn require(r: Result<(), String>) -> bool {
    match r {
        Ok(()) => true,
        Err(why) if std::env::var_os("CI").is_some() => panic!("{why} (CI is set)"),
        Err(why) => {
            let _ =
                std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("skipped: {why}\n"));
            false
        }
    }
}

#[test]
fn systemd_units_verify_and_keep_the_vm_up_across_backend_restarts() {
    let dir = Path::new(ORCH).parent().unwrap();
    let built = ["virtiofsd-fast", "blk-backend", "net-backend"]
        .iter()
        .all(|b| dir.join(b).is_file());
    if !require(if built {
        Ok(())
    } else {
        Err("the backends are not built beside the orchestrator (cargo build --workspace)".into())
    }) || !require(orchestrator::qemu::qemu_available())
    {
        return;
    }
    if tests_passt().is_none() {
        return;
    }
    let Some(analyze) = orchestrator::find_program("systemd-analyze") else {
        require(Err(
            "systemd-analyze not found (apt-get install systemd)".into()
        ));
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let share = work.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let img = work.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let cfg = work.path().join("vm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[vm]\nname = \"svc\"\n[[fs]]\nshared_dir = \"{}\"\ntag = \"project\"\n\
             [[blk]]\nimage = \"{}\"\nreadonly = true\n\
             [[net]]\nuser = true\ntcp_forward = [\"8080:80\"]\n",
            share.display(),
            img.display()
        ),
    )
    .unwrap();
    let out_dir = work.path().join("units");
    let out = Command::new(ORCH)
        .args(["units", "--systemd"])
        .arg(&out_dir)
        .arg("-f")
        .arg(&cfg)
        .env("XDG_RUNTIME_DIR", work.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "vmm-svc-blk0-relay.service",
            "vmm-svc-blk0-relay.socket",
            "vmm-svc-blk0.service",
            "vmm-svc-blk0.socket",
            "vmm-svc-fs0-relay.service",
            "vmm-svc-fs0-relay.socket",
            "vmm-svc-fs0.service",
            "vmm-svc-fs0.socket",
            "vmm-svc-net0-nat.service",
            "vmm-svc-net0-relay.service",
            "vmm-svc-net0-relay.socket",
            "vmm-svc-net0.service",
            "vmm-svc-net0.socket",
            "vmm-svc-vmm.service",
            "vmm-svc.target"
        ]
    );
    let paths: Vec<_> = names.iter().map(|n| out_dir.join(n)).collect();
    let v = Command::new(analyze)
        .arg("verify")
        .args(&paths)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(
        v.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );

    let read = |n: &str| std::fs::read_to_string(out_dir.join(n)).unwrap();
    let blk = read("vmm-svc-blk0.service");
    for want in [
        "Type=notify",
        "NotifyAccess=all",
        "--fd=3",
        "Restart=always",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX",
        "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SETPCAP",
        &format!("ReadOnlyPaths={}", img.display()),
    ] {
        assert!(blk.contains(want), "blk0 service lacks {want}:\n{blk}");
    }
    let fs = read("vmm-svc-fs0.service");
    for want in [
        format!("ReadWritePaths={}", share.display()),
        // The session file a restarted virtiofsd-fast resumes from.
        "--state-file=/run/vmm/svc/fs0.state".into(),
        "ReadWritePaths=/run/vmm/svc".into(),
    ] {
        assert!(fs.contains(&want), "fs0 service lacks {want}:\n{fs}");
    }
    assert!(read("vmm-svc-fs0.socket").contains("ListenStream=/run/vmm/svc/fs0.sock"));
    // QEMU reaches the share through a relay that outlives fs0's restarts.
    assert!(read("vmm-svc-fs0-relay.socket").contains("ListenStream=/run/vmm/svc/fs0.vmm.sock"));
    let relay = read("vmm-svc-fs0-relay.service");
    for want in [
        " relay --fd=3 --backend=/run/vmm/svc/fs0.sock --device=fs0",
        "Restart=always",
        "CapabilityBoundingSet=\n",
    ] {
        assert!(relay.contains(want), "relay service lacks {want}:\n{relay}");
    }
    // A user-mode NIC: passt as a service of its own, which the backend
    // requires and restarts with.
    let nat = read("vmm-svc-net0-nat.service");
    for want in [
        "--foreground",
        "--socket=/run/vmm/svc/net0-nat.passt.sock",
        "--tcp-ports=8080:80",
        "Restart=always",
    ] {
        assert!(nat.contains(want), "net0-nat service lacks {want}:\n{nat}");
    }
    assert!(!nat.contains("--fd="), "{nat}");
    let net = read("vmm-svc-net0.service");
    for want in [
        "Requires=vmm-svc-net0-nat.service",
        "PartOf=vmm-svc-net0-nat.service",
        "--socket=/run/vmm/svc/net0-nat.passt.sock --socket-type=stream",
    ] {
        assert!(net.contains(want), "net0 service lacks {want}:\n{net}");
    }
    let vmm = read("vmm-svc-vmm.service");
    assert!(
        vmm.contains("Wants=vmm-svc-fs0.service vmm-svc-fs0-relay.service vmm-svc-blk0.service"),
        "{vmm}"
    );
    assert!(
        !vmm.contains("BindsTo") && !vmm.contains("Requires="),
        "{vmm}"
    );
    // QEMU talks to each backend through its relay.
    for dev in ["fs0", "blk0", "net0"] {
        assert!(
            vmm.contains(&format!("path=/run/vmm/svc/{dev}.vmm.sock")),
            "{dev}: {vmm}"
        );
    }
    assert!(!vmm.contains("reconnect=1"), "{vmm}");
}

/// With `vmm = "core"` the units run vmm-core, on the backends' own
/// sockets (it reconnects to a restarted backend itself): no relays.
#[test]
fn systemd_units_run_vmm_core_when_the_config_picks_it() {
    let dir = Path::new(ORCH).parent().unwrap();
    let built = ["virtiofsd-fast", "blk-backend", "vmm-core"]
        .iter()
        .all(|b| dir.join(b).is_file());
    if !require(if built {
        Ok(())
    } else {
        Err("the backends and vmm-core are not built beside the orchestrator".into())
    }) || !require(orchestrator::qemu::qemu_available())
    {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let cfg = work.path().join("vm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[vm]\nname = \"core\"\nvmm = \"core\"\n[[fs]]\nshared_dir = \"{}\"\ntag = \"project\"\n\
             [[blk]]\nimage = \"{}\"\n",
            work.path().display(),
            img.display()
        ),
    )
    .unwrap();
    let out_dir = work.path().join("units");
    let out = Command::new(ORCH)
        .args(["units", "--systemd"])
        .arg(&out_dir)
        .arg("-f")
        .arg(&cfg)
        .env("XDG_RUNTIME_DIR", work.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |n: &str| std::fs::read_to_string(out_dir.join(n)).unwrap();
    let vmm = read("vmm-core-vmm.service");
    let exec = vmm.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
    assert!(exec.contains("/vmm-core --kernel"), "{exec}");
    assert!(
        exec.contains("--fs=socket=/run/vmm/core/fs0.sock,tag=project"),
        "{exec}"
    );
    assert!(
        exec.contains("--blk=socket=/run/vmm/core/blk0.sock"),
        "{exec}"
    );
    let names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains("relay")), "{names:?}");
}
