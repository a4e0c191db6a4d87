//! `testbed`: boots a real guest under QEMU with a virtio-fs share (our virtiofsd-fast when it is
//! built beside this binary, else virtiofsd), a scratch vhost-user-blk disk (our blk-backend when
//! it is built beside this binary, else qemu-storage-daemon) and user-mode networking, runs a command in it and exits with the command's exit code. A
//! stand-in for the orchestrator's "run it" until it lands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tests::guest::{self, peers, Qemu};

/// Boot a test guest and run a shell command in it.
#[derive(Debug, Parser)]
struct Args {
    /// Host directory shared with the guest at /mnt/host.
    #[arg(long, value_name = "DIR", default_value = ".")]
    share: PathBuf,
    /// Size of the scratch disk (the guest's /dev/vda).
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    disk_mib: u64,
    /// Give up (and kill the guest) after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    timeout: u64,
    /// After the guest exits, print the virtio-fs daemon's log (with
    /// virtiofsd-fast, the requests it served by opcode).
    #[arg(long)]
    fs_log: bool,
    /// Shell command to run in the guest, from /mnt/host.
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

fn program(name: &str, install: &str) -> anyhow::Result<PathBuf> {
    tests::find_program(name)
        .with_context(|| format!("{name} not found; install it with: {install}"))
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if let Err(why) = guest::qemu_available() {
        bail!("cannot boot a guest: {why}");
    }
    // Our own backend when it was built with this binary (`cargo build`
    // builds the whole workspace), else the peer.
    let beside = std::env::current_exe()?.with_file_name("virtiofsd-fast");
    let (fs_name, virtiofsd) = if beside.is_file() {
        ("virtiofsd-fast", beside)
    } else {
        (
            "virtiofsd",
            program("virtiofsd", "cargo install virtiofsd")?,
        )
    };
    let ours_blk = std::env::current_exe()?.with_file_name("blk-backend");
    let (blk_name, blk_program) = if ours_blk.is_file() {
        ("blk-backend", ours_blk)
    } else {
        (
            "qemu-storage-daemon",
            program("qemu-storage-daemon", "apt-get install qemu-system-common")?,
        )
    };
    let share = args
        .share
        .canonicalize()
        .with_context(|| format!("shared dir {}", args.share.display()))?;

    let work = tempfile::tempdir()?;
    let disk = work.path().join("disk.img");
    std::fs::File::create(&disk)?.set_len(args.disk_mib << 20)?;

    eprintln!("testbed: {fs_name} sharing {}", share.display());
    let fs_daemon = if fs_name == "virtiofsd-fast" {
        // With its defaults: coherent cache, namespace sandbox, seccomp.
        let argv = [
            virtiofsd.to_string_lossy().into_owned(),
            "--fd={fd}".into(),
            format!("--shared-dir={}", share.display()),
        ];
        tests::frontend::BackendProcess::spawn(&argv, Duration::from_secs(20))?
    } else {
        peers::virtiofsd(&virtiofsd, &share)?
    };
    eprintln!(
        "testbed: {blk_name} serving a {} MiB scratch disk",
        args.disk_mib
    );
    let blk_daemon = if blk_name == "blk-backend" {
        let argv = [
            blk_program.to_string_lossy().into_owned(),
            "--fd={fd}".into(),
            format!("--image={}", disk.display()),
        ];
        tests::frontend::BackendProcess::spawn(&argv, Duration::from_secs(20))?
    } else {
        peers::storage_daemon(&blk_program, &disk)?
    };

    let cmd = if args.cmd.is_empty() {
        "ls -la /mnt/host; cat /proc/partitions; ip addr".to_owned()
    } else {
        args.cmd.join(" ")
    };
    let script = format!("cd /mnt/host || exit 125\n{cmd}\n");
    eprintln!("testbed: booting the guest to run: {cmd}");
    let qemu = Qemu::new()
        .fs(fs_daemon.socket(), "share")
        .blk(blk_daemon.socket())
        .user_net()
        .kernel_arg("testbed.fs=share:/mnt/host");
    let run = match qemu.run(&script, Duration::from_secs(args.timeout)) {
        Ok(run) => run,
        Err(e) => bail!(
            "{:#}\n--- {fs_name} ---\n{}\n--- {blk_name} ---\n{}",
            anyhow::Error::from(e),
            fs_daemon.output(),
            blk_daemon.output()
        ),
    };
    for line in run.script_lines() {
        println!("{line}");
    }
    eprintln!(
        "testbed: guest exited with {} after {:.1?}",
        run.exit_code, run.elapsed
    );
    if args.fs_log {
        // virtiofsd-fast logs its counts once the frontend has gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while fs_name == "virtiofsd-fast"
            && !fs_daemon.output().contains("requests served")
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("--- {fs_name} ---\n{}", fs_daemon.output());
    }
    Ok(ExitCode::from(
        u8::try_from(run.exit_code).unwrap_or(u8::MAX),
    ))
}
