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
        Command::Up(a) => up(a),
        Command::Console(a) => console(&a.name),
        Command::Status(a) => status(&a.name),
        Command::Logs(a) => logs(&a),
        Command::ShowCmd(a) => {
            let cfg = load_or_default(a.file.as_deref())?;
            let root = orchestrator::state::base_dir().join(&cfg.name);
            let spec = vm::device_specs(&cfg, &root)?
                .into_iter()
                .find(|s| s.name == a.device)
                .with_context(|| format!("no device {} in this VM (fs0.., blk0..)", a.device))?;
            println!("{}", spec.command_line().join(" "));
            Ok(ExitCode::SUCCESS)
        }
        Command::Units(a) => {
            let cfg = load_or_default(a.file.as_deref())?;
            let run_dir = a.run_dir.join(&cfg.name);
            let specs = vm::device_specs(&cfg, &run_dir)?;
            // The VMM the config picks: vmm-core reconnects to a restarted
            // backend itself; QEMU reaches each backend through a relay.
            // A helper (passt) serves a backend, not the VMM.
            let core = vm::units_vmm_core(cfg.vmm)?;
            let relayed = core.is_none();
            let sockets: Vec<_> = specs
                .iter()
                .filter(|s| s.ready_path.is_none())
                .map(|s| match relayed {
                    true => run_dir.join(format!("{}.vmm.sock", s.name)),
                    false => run_dir.join(format!("{}.sock", s.name)),
                })
                .collect();
            let q = vm::vmm_for(&cfg, &sockets, core.as_deref());
            let img = image::build(q.image_config())?;
            let cmd = q.command(&img.kernel, &img.initramfs);
            let mut vmm = vec![cmd.get_program().to_string_lossy().into_owned()];
            vmm.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
            let mut sets = Vec::new();
            if let Some(d) = &a.systemd {
                sets.push((
                    d,
                    orchestrator::units::systemd(&cfg, &specs, &run_dir, &vmm, relayed),
                ));
            }
            if let Some(d) = &a.launchd {
                sets.push((
                    d,
                    orchestrator::units::launchd(&cfg, &specs, &run_dir, &vmm, relayed),
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
        Command::Relay(a) => {
            let listener = match (&a.listen, a.fd) {
                (_, Some(fd)) => {
                    use std::os::fd::FromRawFd;
                    // SAFETY: the descriptor systemd (or the caller) handed
                    // over for this; nothing else here owns it.
                    unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) }
                }
                (Some(path), None) => {
                    let _ = std::fs::remove_file(path);
                    std::os::unix::net::UnixListener::bind(path)
                        .with_context(|| format!("binding {}", path.display()))?
                }
                (None, None) => anyhow::bail!("give --listen PATH or --fd N"),
            };
            eprintln!(
                "orchestrator: relaying {} to {}",
                a.device,
                a.backend.display()
            );
            orchestrator::relay::serve(&a.device, &listener, &a.backend);
            Ok(ExitCode::SUCCESS)
        }
        Command::Down(a) => down(&a.name),
    }
}

/// Ask a VM's orchestrator to stop it (SIGTERM: the VMM, then the
/// backends, each given time to stop cleanly), wait, and force it if it
/// takes too long.
fn down(name: &str) -> anyhow::Result<ExitCode> {
    let st = VmStatus::read(name).with_context(|| format!("VM `{name}` is not running"))?;
    let pid = st.orchestrator_pid;
    // SAFETY: kill with a pid read from our own status file.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
        bail!("VM `{name}`: its orchestrator (pid {pid}) is gone; the status file is stale");
    }
    eprintln!("orchestrator: stopping VM `{name}` (orchestrator pid {pid})");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while orchestrator::process_runs(pid) {
        if std::time::Instant::now() > deadline {
            eprintln!("orchestrator: VM `{name}` did not stop within 30 s; killing it");
            // SAFETY: as above; its children die with it (PDEATHSIG).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("VM `{name}` is down");
    Ok(ExitCode::SUCCESS)
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

/// The VM of `file` (or the default one, whose scratch disk lives in its
/// state directory) and its state directory, locked.
fn config_and_state(
    file: Option<&std::path::Path>,
    publish: &[String],
) -> anyhow::Result<(config::VmConfig, StateDir)> {
    let cfg_file = file.map(config::load).transpose()?;
    let name = cfg_file
        .as_ref()
        .map_or("default".to_string(), |c| c.name.clone());
    let state = StateDir::acquire(&name)?;
    let mut cfg = match cfg_file {
        Some(c) => c,
        None => vm::default_config(&state.root)?,
    };
    config::publish(&mut cfg, publish).map_err(anyhow::Error::msg)?;
    Ok((cfg, state))
}

fn run_vm(a: cli::RunArgs) -> anyhow::Result<ExitCode> {
    let (cfg, state) = config_and_state(a.file.as_deref(), &a.publish)?;
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
    let qmp_path: Result<std::path::PathBuf, ()> = running
        .supervisor
        .lock()
        .map(|s| s.state().root.join("qmp.sock"))
        .map_err(|_| ());
    let mut q = running.qemu.clone();
    if let Ok(p) = &qmp_path {
        let _ = std::fs::remove_file(p);
        q = q.qmp(p);
    }
    let code = if a.cmd.is_empty() {
        let status = q.interactive()?;
        status.code().unwrap_or(1)
    } else {
        let timeout = if a.timeout == 0 {
            Duration::from_secs(10 * 365 * 86400)
        } else {
            Duration::from_secs(a.timeout)
        };
        let script = format!("cd /mnt/host 2>/dev/null\n{}\n", guest_command(&a.cmd));
        let run = q.stream(true).run(&script, timeout)?;
        run.exit_code
    };
    running.down();
    if let Ok(p) = &qmp_path {
        let _ = std::fs::remove_file(p);
    }
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the pid exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// `up`: in the foreground it is `run` without a command; with -d it
/// starts the orchestrator again in the background (`--daemon`), waits
/// until QEMU reports the VM running, and returns.
fn up(a: cli::UpArgs) -> anyhow::Result<ExitCode> {
    if a.daemon {
        return up_daemon(a);
    }
    if !a.detach {
        return run_vm(cli::RunArgs {
            file: a.file,
            verbose: a.verbose,
            publish: a.publish,
            timeout: 0,
            cmd: Vec::new(),
        });
    }
    // The config is checked here, so its errors reach this terminal.
    let cfg = a.file.as_ref().map(|f| config::load(f)).transpose()?;
    let name = cfg
        .as_ref()
        .map_or("default".to_string(), |c| c.name.clone());
    if let Some(st) = VmStatus::read(&name) {
        if alive(st.orchestrator_pid) {
            bail!(
                "VM `{name}` is already up (orchestrator pid {}); `orchestrator down --name {name}` stops it",
                st.orchestrator_pid
            );
        }
    }
    let dir = state::dir_of(&name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join("orchestrator.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["up", "--daemon"]);
    if let Some(f) = &a.file {
        cmd.arg("-f").arg(std::path::absolute(f)?);
    }
    if a.verbose {
        cmd.arg("-v");
    }
    config::check_publish(&a.publish).map_err(anyhow::Error::msg)?;
    for p in &a.publish {
        cmd.arg(format!("--publish={p}"));
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid and sigprocmask are async-signal-safe; the daemon leaves this
    // terminal's session, so closing the terminal does not stop the VM.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            orchestrator::unblock_signals_in_child()
        });
    }
    let mut child = cmd
        .spawn()
        .context("starting the background orchestrator")?;
    eprintln!(
        "orchestrator: starting VM `{name}` in the background (its log: {})",
        log_path.display()
    );
    let qmp = dir.join("qmp.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(code) = child.try_wait()? {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the VM's orchestrator exited ({code}) before the VM was up:\n{}",
                tail.join("\n")
            );
        }
        let vmm = VmStatus::read(&name).and_then(|s| s.vmm_pid);
        if let (Some(pid), Ok((state, _))) = (vmm, orchestrator::qmp::vmm_state(&qmp)) {
            println!("VM `{name}` is up: VMM pid {pid}, {state}");
            println!("  console: orchestrator console --name {name}   (Ctrl-] detaches)");
            println!("  status:  orchestrator status --name {name}");
            println!("  stop:    orchestrator down --name {name}");
            return Ok(ExitCode::SUCCESS);
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "VM `{name}` is not up after 180 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The background orchestrator of `up -d`: backends, then QEMU with its
/// console and QMP on sockets; until QEMU exits or a signal comes.
fn up_daemon(a: cli::UpArgs) -> anyhow::Result<ExitCode> {
    let (cfg, state) = config_and_state(a.file.as_deref(), &a.publish)?;
    let signals = block_signals();
    let root = state.root.clone();
    let running = vm::start(&cfg, state, a.verbose)?;
    let console = root.join("console.sock");
    let qmp = root.join("qmp.sock");
    for p in [&console, &qmp] {
        let _ = std::fs::remove_file(p);
    }
    let mut qemu = match running
        .qemu
        .clone()
        .console_socket(&console)
        .qmp(&qmp)
        .spawn()
    {
        Ok(q) => q,
        Err(e) => {
            running.down();
            return Err(e.into());
        }
    };
    let pid = qemu.id();
    eprintln!("orchestrator: VMM started, pid {pid}");
    if let Ok(mut s) = running.supervisor.lock() {
        s.set_vmm_pid(Some(pid));
    }
    // A signal stops QEMU (gracefully, then for good); the VM's end below
    // then brings the backends down.
    std::thread::spawn(move || {
        let sig = wait_signal(&signals);
        eprintln!("orchestrator: signal {sig}: stopping the VM");
        // SAFETY: signalling the QEMU we started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        std::thread::sleep(Duration::from_secs(10));
        // SAFETY: as above; it did not stop in time.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    });
    let status = qemu.wait()?;
    eprintln!("orchestrator: VMM exited ({status}); stopping the backends");
    running.down();
    for p in [&console, &qmp] {
        let _ = std::fs::remove_file(p);
    }
    Ok(ExitCode::SUCCESS)
}

/// Relay this terminal to and from a VM's console socket until Ctrl-]
/// or the VM goes.
fn console(name: &str) -> anyhow::Result<ExitCode> {
    use std::os::fd::AsRawFd;
    let path = state::dir_of(name).join("console.sock");
    let sock = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "VM `{name}` has no console socket at {} (is it up with `orchestrator up -d`?)",
            path.display()
        )
    })?;
    eprintln!("orchestrator: console of VM `{name}`; Ctrl-] detaches");
    let _raw = RawTerminal::enter(std::io::stdin().as_raw_fd());
    let mut from_vm = sock.try_clone()?;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_vm, &mut std::io::stdout());
        // The VM went away: end the session.
        std::process::exit(0);
    });
    let mut to_vm = sock;
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        let n = stdin.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if let Some(at) = chunk.iter().position(|&b| b == 0x1d) {
            to_vm.write_all(&chunk[..at])?;
            break;
        }
        to_vm.write_all(chunk)?;
    }
    drop(_raw);
    eprintln!("\r\norchestrator: detached from VM `{name}`");
    Ok(ExitCode::SUCCESS)
}

/// The terminal in raw mode (keys go to the guest as typed) until dropped;
/// nothing when stdin is not a terminal.
struct RawTerminal(Option<(i32, libc::termios)>);

impl RawTerminal {
    fn enter(fd: i32) -> Self {
        // SAFETY: isatty/tcgetattr/tcsetattr on stdin with a termios we own.
        unsafe {
            if libc::isatty(fd) != 1 {
                return RawTerminal(None);
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut t) != 0 {
                return RawTerminal(None);
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
            RawTerminal(Some((fd, saved)))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some((fd, t)) = self.0 {
            // SAFETY: restoring the settings read in `enter`.
            unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
        }
    }
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
        let host = if addr.starts_with(':') {
            format!("localhost{addr}")
        } else {
            addr.clone()
        };
        eprintln!(
            "orchestrator: {} waits for a debugger: gdb -ex 'set follow-fork-mode child' \
             -ex 'target remote {host}' -ex continue (the serving process is the child \
             that enters the sandbox)",
            a.device
        );
    }
    eprintln!(
        "orchestrator: {} attached here: {}",
        a.device,
        argv.join(" ")
    );
    // The backend never gets this terminal: it runs in a session of its
    // own with stdin on /dev/null, its output comes through pipes that
    // this process copies here, and Ctrl-C (or a TERM) is passed on to it
    // as a signal. So it cannot push input into the user's shell (TIOCSTI).
    let mask = block_signals();
    let raw = fd.as_raw_fd();
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: async-signal-safe calls only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            orchestrator::unblock_signals_in_child()?;
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
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
    let status = cmd.spawn().and_then(|mut child| {
        let copies = [
            child.stdout.take().map(|o| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut { o }, &mut std::io::stdout());
                })
            }),
            child.stderr.take().map(|e| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut { e }, &mut std::io::stderr());
                })
            }),
        ];
        let pid = child.id() as libc::pid_t;
        std::thread::spawn(move || forward_signals(mask, pid));
        let status = child.wait();
        for c in copies.into_iter().flatten() {
            let _ = c.join();
        }
        status
    });
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

/// Wait for the signals in `set` (blocked in every thread) and pass each
/// on to `pid`, for as long as this process lives.
fn forward_signals(set: libc::sigset_t, pid: libc::pid_t) {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait reads the set and writes the signal number.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            // SAFETY: kill takes integers only.
            unsafe { libc::kill(pid, sig) };
        }
    }
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
    // The VMM's own word on the VM, through its API.
    let qmp = state::dir_of(name).join("qmp.sock");
    let vmm_pid = st.vmm_pid.map_or(String::new(), |p| format!(" pid {p},"));
    match orchestrator::qmp::vmm_state(&qmp) {
        Ok((s, via)) => println!("VMM:{vmm_pid} {s} ({via})"),
        Err(e) if qmp.exists() => println!("VMM:{vmm_pid} not answering on QMP: {e}"),
        Err(_) => println!("VMM:{vmm_pid} no QMP or control API socket"),
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    println!(
        "{:<8} {:>8} {:<11} {:>8} {:>8} {:>9}  SOCKET",
        "DEVICE", "PID", "STATE", "RESTARTS", "UPTIME", "LAST DOWN"
    );
    for d in &st.devices {
        let up = if d.pid.is_some() {
            let s = now.saturating_sub(d.started_at);
            format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
        } else {
            "-".into()
        };
        println!(
            "{:<8} {:>8} {:<11} {:>8} {:>8} {:>9}  {}",
            d.device,
            d.pid.map_or("-".into(), |p| p.to_string()),
            d.state,
            d.restarts,
            up,
            d.last_down_ms.map_or("-".into(), |ms| format!("{ms} ms")),
            d.socket.display()
        );
    }
    for d in st.devices.iter().filter(|d| d.state == "crash-loop") {
        println!(
            "{} is crashing in a loop; last error: {}\n  see `orchestrator logs {}{}`",
            d.device,
            d.last_error.as_deref().unwrap_or("unknown"),
            d.device,
            if name == "default" {
                String::new()
            } else {
                format!(" --name {name}")
            }
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

/// The guest's shell line for `run -- CMD...`: one word is a script of its
/// own (`run -- 'make && ./test'`); several are a command and its
/// arguments, each kept whole as the user's shell split them (`run -- sh
/// -c 'a; b'`), as `docker run` does.
fn guest_command(words: &[String]) -> String {
    match words {
        [script] => script.clone(),
        _ => words
            .iter()
            .map(|w| sh_quote(w))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// `word` for a POSIX shell: as it is when it is plain, else in single
/// quotes.
fn sh_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod guest_command_tests {
    use super::*;

    #[test]
    fn words_stay_whole_and_one_word_is_a_script() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            guest_command(&w(&["ls", "-la", "/mnt/host"])),
            "ls -la /mnt/host"
        );
        assert_eq!(guest_command(&w(&["echo a; exit 3"])), "echo a; exit 3");
        assert_eq!(
            guest_command(&w(&["sh", "-c", "echo a; exit 3"])),
            "sh -c 'echo a; exit 3'"
        );
        assert_eq!(
            guest_command(&w(&["echo", "it's", ""])),
            "echo 'it'\\''s' ''"
        );
    }
}
