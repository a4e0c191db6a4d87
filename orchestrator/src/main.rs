//! `orchestrator`: boots VMs whose devices are supervised backend processes.

mod cli;

use std::io::{Read, Seek, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use cli::{Cli, Command, ImageCommand};
use orchestrator::state::{self, StateDir, VmStatus};
use orchestrator::{config, image, vm};

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("orchestrator: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Image(ImageCommand::Build(args)) => {
            let img = image::build(&args.into())?;
            println!("kernel={}", img.kernel.display());
            println!("initrd={}", img.initramfs.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(a) => run_vm(a),
        Command::Status(a) => status(&a.name),
        Command::Logs(a) => logs(&a),
        Command::ShowCmd(a) => {
            let cfg = load_or_default(a.file.as_deref())?;
            let spec = vm::device_specs(&cfg)?
                .into_iter()
                .find(|s| s.name == a.device)
                .with_context(|| format!("no device {} in this VM (fs0.., blk0..)", a.device))?;
            println!("{}", spec.command_line().join(" "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Units(a) => {
            let cfg = load_or_default(a.file.as_deref())?;
            let specs = vm::device_specs(&cfg)?;
            let run_dir = a.run_dir.join(&cfg.name);
            let sockets: Vec<_> = specs
                .iter()
                .map(|s| run_dir.join(format!("{}.sock", s.name)))
                .collect();
            let q = vm::qemu_for(&cfg, &sockets);
            let img = image::build(q.image_config())?;
            let cmd = q.command(&img.kernel, &img.initramfs);
            let mut vmm = vec![cmd.get_program().to_string_lossy().into_owned()];
            vmm.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
            let mut sets = Vec::new();
            if let Some(d) = &a.systemd {
                sets.push((
                    d,
                    orchestrator::units::systemd(&cfg, &specs, &run_dir, &vmm),
                ));
            }
            if let Some(d) = &a.launchd {
                sets.push((
                    d,
                    orchestrator::units::launchd(&cfg, &specs, &run_dir, &vmm),
                ));
            }
            for (dir, units) in sets {
                std::fs::create_dir_all(dir)?;
                for u in units {
                    let path = dir.join(&u.name);
                    std::fs::write(&path, u.text)
                        .with_context(|| format!("writing {}", path.display()))?;
                    println!("{}", path.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restart(a) => {
            let path = state::dir_of(&a.name).join("control.sock");
            orchestrator::control::request(&path, "restart", &a.device)
                .map_err(anyhow::Error::msg)?;
            println!("{}: restarting", a.device);
            Ok(ExitCode::SUCCESS)
        }
        Command::Attach(a) => attach(&a),
        Command::Down(a) => {
            let st = VmStatus::read(&a.name)
                .with_context(|| format!("VM `{}` is not running", a.name))?;
            // SAFETY: kill with a pid read from our own status file.
            if unsafe { libc::kill(st.orchestrator_pid as libc::pid_t, libc::SIGTERM) } != 0 {
                bail!(
                    "VM `{}`: its orchestrator (pid {}) is gone",
                    a.name,
                    st.orchestrator_pid
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The VM of `file`, or the default one (whose scratch disk lives in the
/// default VM's state directory).
fn load_or_default(file: Option<&std::path::Path>) -> anyhow::Result<config::VmConfig> {
    Ok(match file {
        Some(f) => config::load(f)?,
        None => {
            let dir = state::dir_of("default");
            std::fs::create_dir_all(&dir)?;
            vm::default_config(&dir)?
        }
    })
}

fn run_vm(a: cli::RunArgs) -> anyhow::Result<ExitCode> {
    let cfg_file = a.file.as_ref().map(|f| config::load(f)).transpose()?;
    let name = cfg_file
        .as_ref()
        .map_or("default".to_string(), |c| c.name.clone());
    let state = StateDir::acquire(&name)?;
    let cfg = match cfg_file {
        Some(c) => c,
        None => vm::default_config(&state.root)?,
    };
    // SIGINT and SIGTERM go to one thread that brings everything down;
    // blocked here, before any thread starts, so every thread inherits it.
    let signals = block_signals();
    let running = vm::start(&cfg, state, a.verbose)?;
    {
        let sup = std::sync::Arc::clone(&running.supervisor);
        std::thread::spawn(move || {
            let sig = wait_signal(&signals);
            eprintln!("orchestrator: signal {sig}: shutting down");
            if let Ok(mut s) = sup.lock() {
                s.shutdown(Duration::from_secs(5));
            }
            std::process::exit(128 + sig);
        });
    }
    let q = running.qemu.clone();
    let code = if a.cmd.is_empty() {
        let status = q.interactive()?;
        status.code().unwrap_or(1)
    } else {
        let timeout = if a.timeout == 0 {
            Duration::from_secs(10 * 365 * 86400)
        } else {
            Duration::from_secs(a.timeout)
        };
        let script = format!("cd /mnt/host 2>/dev/null\n{}\n", a.cmd.join(" "));
        let run = q.stream(true).run(&script, timeout)?;
        run.exit_code
    };
    running.down();
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn attach(a: &cli::AttachArgs) -> anyhow::Result<ExitCode> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let path = state::dir_of(&a.name).join("control.sock");
    let (cmd, fd) =
        orchestrator::control::request(&path, "hold", &a.device).map_err(anyhow::Error::msg)?;
    let fd = fd.context("the orchestrator sent no socket")?;
    let mut argv: Vec<String> = serde_json::from_str(&cmd).context("the device's command line")?;
    argv.retain(|w| !w.starts_with("--fd=") && !w.starts_with("--log-level="));
    argv.push("--log-level=debug".into());
    argv.push(format!("--fd={}", orchestrator::supervisor::LISTEN_FD));
    if let Some(addr) = &a.gdb {
        let gdb = orchestrator::find_program("gdbserver")
            .context("gdbserver not found: apt-get install gdbserver")?;
        argv.insert(0, addr.clone());
        argv.insert(0, gdb.display().to_string());
    }
    eprintln!(
        "orchestrator: {} attached here: {}",
        a.device,
        argv.join(" ")
    );
    // Ctrl-C is for the backend; this process only waits and hands back.
    // SAFETY: setting a signal disposition; no handler runs.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let raw = fd.as_raw_fd();
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    // SAFETY: async-signal-safe calls only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            let target = orchestrator::supervisor::LISTEN_FD;
            if raw == target {
                let flags = libc::fcntl(raw, libc::F_GETFD);
                libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(raw, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = cmd.status();
    drop(fd);
    let back = orchestrator::control::request(&path, "release", &a.device);
    let status = status.with_context(|| format!("running {}", argv[0]))?;
    match back {
        Ok(_) => eprintln!(
            "orchestrator: {} exited ({status}); back under supervision",
            a.device
        ),
        Err(e) => eprintln!(
            "orchestrator: {} exited ({status}); could not hand it back: {e}",
            a.device
        ),
    }
    Ok(ExitCode::from(
        u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
    ))
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset, which
    // initializes it; sigprocmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` was built by block_signals; sigwait writes `sig`.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

fn status(name: &str) -> anyhow::Result<ExitCode> {
    let Some(st) = VmStatus::read(name) else {
        println!("VM `{name}`: not running");
        return Ok(ExitCode::SUCCESS);
    };
    // SAFETY: signal 0 only checks that the pid exists.
    let alive = unsafe { libc::kill(st.orchestrator_pid as libc::pid_t, 0) } == 0;
    println!(
        "VM `{}`: orchestrator pid {}{}, vmm {}",
        st.name,
        st.orchestrator_pid,
        if alive {
            ""
        } else {
            " (gone: this status is stale)"
        },
        st.vmm
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    println!(
        "{:<8} {:>8} {:<11} {:>8} {:>8}  SOCKET",
        "DEVICE", "PID", "STATE", "RESTARTS", "UPTIME"
    );
    for d in &st.devices {
        let up = if d.pid.is_some() {
            let s = now.saturating_sub(d.started_at);
            format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
        } else {
            "-".into()
        };
        println!(
            "{:<8} {:>8} {:<11} {:>8} {:>8}  {}",
            d.device,
            d.pid.map_or("-".into(), |p| p.to_string()),
            d.state,
            d.restarts,
            up,
            d.socket.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn logs(a: &cli::LogsArgs) -> anyhow::Result<ExitCode> {
    let path = state::dir_of(&a.name)
        .join("logs")
        .join(format!("{}.log", a.device));
    let mut f = std::fs::File::open(&path).with_context(|| {
        format!(
            "no log for {} of VM `{}` ({})",
            a.device,
            a.name,
            path.display()
        )
    })?;
    let mut out = std::io::stdout();
    loop {
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        out.write_all(&buf)?;
        out.flush()?;
        if !a.follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(200));
        let pos = f.stream_position()?;
        f.seek(std::io::SeekFrom::Start(pos))?;
    }
}
