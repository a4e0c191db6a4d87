//! Starting, watching and restarting the backend processes.
//!
//! The supervisor binds each device's listening socket itself and hands it
//! to the backend as `--fd`, so a restarted backend listens on the same
//! path and the VMM's reconnect finds it. A backend is ready when it sends
//! `READY=1` to its notify socket (never a fixed sleep). One that dies is
//! restarted with bounded exponential backoff while the VM keeps running.
//!
//! A helper (passt, the user-mode network a NIC's backend talks to) is
//! supervised the same way but gets no socket: it makes its own, and is
//! ready when that appears. The backend that uses it starts again after it
//! does, since the connection it held died with the old helper.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::state::{DeviceStatus, StateDir, VmStatus};

/// The descriptor number a backend finds its listening socket at.
pub const LISTEN_FD: RawFd = 3;
/// Restart delay after a quick death; doubles per quick death in a row up
/// to [`BACKOFF_MAX`]. After a healthy run a backend restarts at once.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A backend that served this long before dying had worked: it starts
/// again from the shortest delay. One that dies sooner died quickly, and
/// the delay doubles.
const HEALTHY: Duration = Duration::from_secs(1);
/// This many quick deaths in a row: the backend is crashing in a loop,
/// which `status` and the log say, with its last words.
const CRASH_LOOP: u32 = 3;
/// How long a restarted helper gets to make its socket before the device
/// that uses it starts again.
const HELPER_SETTLE: Duration = Duration::from_millis(300);
/// How long a backend may take to report readiness.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// What to run for one device.
#[derive(Debug, Clone, Default)]
pub struct DeviceSpec {
    /// "fs0", "blk0", ...
    pub name: String,
    pub program: PathBuf,
    /// Arguments, without the `--fd`.
    pub args: Vec<String>,
    /// Descriptors handed over too: (ours, the number the child sees).
    pub pass_fds: Vec<(std::sync::Arc<std::os::fd::OwnedFd>, RawFd)>,
    /// A tap the supervisor opens, with this many queues, and hands over
    /// as fds 4, 5, ... (`--tap-fd=4,5,...`).
    pub open_tap: Option<(String, u16)>,
    /// A helper, not a vhost-user backend: no socket or `--fd` is given
    /// to it, and it is ready once it has made this one.
    pub ready_path: Option<PathBuf>,
    /// The helper this device talks to: when that starts again, so does
    /// this.
    pub follows: Option<String>,
}

impl DeviceSpec {
    /// The full command line, as the supervisor runs it.
    pub fn command_line(&self) -> Vec<String> {
        let mut v = vec![self.program.display().to_string()];
        v.extend(self.args.iter().cloned());
        if self.ready_path.is_none() {
            v.push(format!("--fd={LISTEN_FD}"));
        }
        v
    }
}

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("{device}: {what}: {source}")]
    Io {
        device: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{device} did not become ready: {why}\n--- last lines of its log ({log}) ---\n{tail}")]
    NotReady {
        device: String,
        why: String,
        log: String,
        tail: String,
    },
}

struct Device {
    spec: DeviceSpec,
    socket: PathBuf,
    /// None for a helper.
    listener: Option<UnixListener>,
    notify: UnixDatagram,
    notify_path: PathBuf,
    log_path: PathBuf,
    log: Arc<Mutex<File>>,
    child: Option<Child>,
    restarts: u32,
    started: Instant,
    started_at: u64,
    backoff: Duration,
    restart_at: Option<Instant>,
    /// Taken out of supervision (stopped on purpose).
    held: bool,
    /// Deaths in a row within [`HEALTHY`] of starting.
    quick_deaths: u32,
    /// How the last process ended, and its last line of output.
    last_error: Option<String>,
    /// When the last process died, until its successor reports ready.
    down_since: Option<Instant>,
    /// How long the device had no backend at its last restart (death to
    /// the successor's READY=1): what the guest's requests waited.
    last_down: Option<Duration>,
}

/// The running backends of one VM.
pub struct Supervisor {
    state: StateDir,
    devices: Vec<Device>,
    status: VmStatus,
    /// Echo children's output on our stderr (prefixed with the device).
    echo: bool,
    stopping: bool,
}

impl Supervisor {
    pub fn new(state: StateDir, vmm: &str, echo: bool) -> Self {
        let status = VmStatus {
            name: state.name.clone(),
            orchestrator_pid: std::process::id(),
            vmm: vmm.into(),
            vmm_pid: None,
            devices: Vec::new(),
        };
        Supervisor {
            state,
            devices: Vec::new(),
            status,
            echo,
            stopping: false,
        }
    }

    pub fn state(&self) -> &StateDir {
        &self.state
    }

    /// Bind the device's socket, start it and wait until it is ready.
    /// Returns the socket path for the VMM.
    pub fn add(&mut self, spec: DeviceSpec) -> Result<PathBuf, SuperviseError> {
        let io = |what| {
            let device = spec.name.clone();
            move |source| SuperviseError::Io {
                device,
                what,
                source,
            }
        };
        let socket = match &spec.ready_path {
            Some(p) => p.clone(),
            None => self.state.socket(&spec.name),
        };
        // A socket left by an orchestrator that was killed: ours now (the
        // state lock says nobody else is using it).
        let _ = std::fs::remove_file(&socket);
        let listener = match spec.ready_path {
            Some(_) => None,
            None => Some(UnixListener::bind(&socket).map_err(io("binding its socket"))?),
        };
        let notify_path = self.state.notify(&spec.name);
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).map_err(io("binding its notify socket"))?;
        let log_path = self.state.log(&spec.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("opening its log"))?;
        let mut d = Device {
            spec,
            socket: socket.clone(),
            listener,
            notify,
            notify_path,
            log_path,
            log: Arc::new(Mutex::new(log)),
            child: None,
            restarts: 0,
            started: Instant::now(),
            started_at: 0,
            backoff: BACKOFF_MIN,
            restart_at: None,
            held: false,
            quick_deaths: 0,
            last_error: None,
            down_since: None,
            last_down: None,
        };
        spawn(&mut d, self.echo)?;
        wait_ready(&mut d)?;
        self.devices.push(d);
        self.write_status();
        Ok(socket)
    }

    /// Note the VMM's pid for `status`.
    pub fn set_vmm_pid(&mut self, pid: Option<u32>) {
        self.status.vmm_pid = pid;
        self.write_status();
    }

    /// Reap dead backends and restart those whose delay is over. Call it
    /// every few hundred milliseconds.
    pub fn poll(&mut self) {
        let mut changed = false;
        let mut restarted_helpers: Vec<String> = Vec::new();
        for d in &mut self.devices {
            if let Some(child) = &mut d.child {
                if let Ok(Some(status)) = child.try_wait() {
                    d.child = None;
                    d.down_since = Some(Instant::now());
                    // One that had served restarts at once: the guest's
                    // requests wait for it. One that died quickly waits,
                    // longer each time, so a crash loop does not spin.
                    let delay = if d.started.elapsed() >= HEALTHY {
                        d.backoff = BACKOFF_MIN;
                        d.quick_deaths = 0;
                        Duration::ZERO
                    } else {
                        d.quick_deaths += 1;
                        let delay = d.backoff;
                        d.backoff = (d.backoff * 2).min(BACKOFF_MAX);
                        delay
                    };
                    d.restart_at = Some(Instant::now() + delay);
                    let last_words = last_line(&d.log_path);
                    d.last_error = Some(match &last_words {
                        Some(l) => format!("{status}; its last line: {l}"),
                        None => status.to_string(),
                    });
                    // The supervisor's own events always reach the terminal.
                    log_line(
                        &d.log,
                        true,
                        &d.spec.name,
                        &format!(
                            "orchestrator: {} exited ({status}); restarting {}",
                            d.spec.name,
                            if delay.is_zero() {
                                "now".to_string()
                            } else {
                                format!("in {delay:?}")
                            }
                        ),
                    );
                    if d.quick_deaths == CRASH_LOOP {
                        log_line(
                            &d.log,
                            true,
                            &d.spec.name,
                            &format!(
                                "orchestrator: {} is crashing in a loop ({} deaths within {HEALTHY:?} \
                                 of starting); last error: {}; see `orchestrator logs {}`",
                                d.spec.name,
                                d.quick_deaths,
                                d.last_error.as_deref().unwrap_or("none"),
                                d.spec.name
                            ),
                        );
                    }
                    changed = true;
                }
            }
            if d.child.is_some() && d.down_since.is_some() && ready_now(d) {
                let down = d.down_since.take().unwrap_or_else(Instant::now).elapsed();
                d.last_down = Some(down);
                log_line(
                    &d.log,
                    true,
                    &d.spec.name,
                    &format!(
                        "orchestrator: {} ready again; it was down {} ms (the guest's requests to it waited at least that long)",
                        d.spec.name,
                        down.as_millis()
                    ),
                );
                changed = true;
            }
            if d.child.is_none() && !d.held && d.restart_at.is_some_and(|t| Instant::now() >= t) {
                d.restart_at = None;
                d.restarts += 1;
                match spawn(d, self.echo) {
                    Err(e) => {
                        log_line(&d.log, true, &d.spec.name, &format!("orchestrator: {e}"));
                        d.restart_at = Some(Instant::now() + d.backoff);
                    }
                    Ok(()) if d.spec.ready_path.is_some() => {
                        restarted_helpers.push(d.spec.name.clone())
                    }
                    Ok(()) => {}
                }
                changed = true;
            }
        }
        for helper in restarted_helpers {
            for d in self
                .devices
                .iter_mut()
                .filter(|d| d.spec.follows.as_deref() == Some(helper.as_str()) && !d.held)
            {
                log_line(
                    &d.log,
                    true,
                    &d.spec.name,
                    &format!(
                        "orchestrator: {helper} started again; so does {}",
                        d.spec.name
                    ),
                );
                if let Some(c) = d.child.take() {
                    stop_child(c, Duration::from_secs(5));
                }
                d.backoff = BACKOFF_MIN;
                // Once the helper has made its socket again.
                d.restart_at = Some(Instant::now() + HELPER_SETTLE);
            }
        }
        if changed {
            self.write_status();
        }
    }

    /// Take `device` out of supervision for debugging: stop its process and
    /// return a duplicate of its listening socket and its command line.
    /// [`Supervisor::release`] hands it back.
    pub fn hold(&mut self, device: &str) -> Result<(std::os::fd::OwnedFd, Vec<String>), String> {
        let d = self.find(device)?;
        if d.listener.is_none() {
            return Err(format!(
                "{device} is a helper ({}), not a vhost-user backend: attach to the device that \
                 uses it, or see `orchestrator logs {device}`",
                d.spec.program.display()
            ));
        }
        if d.held {
            return Err(format!("{device} is already attached elsewhere"));
        }
        d.held = true;
        d.restart_at = None;
        if let Some(c) = d.child.take() {
            stop_child(c, Duration::from_secs(5));
        }
        let fd = d
            .listener
            .as_ref()
            .ok_or_else(|| format!("{device} has no socket"))?
            .try_clone()
            .map_err(|e| format!("duplicating {device}'s socket: {e}"))?;
        let cmd = d.spec.command_line();
        log_line(
            &d.log,
            true,
            device,
            "orchestrator: attached elsewhere; not supervised",
        );
        self.write_status();
        Ok((fd.into(), cmd))
    }

    /// Supervise `device` again (after [`Supervisor::hold`]): start it now.
    pub fn release(&mut self, device: &str) -> Result<(), String> {
        let d = self.find(device)?;
        d.held = false;
        d.backoff = BACKOFF_MIN;
        d.restart_at = Some(Instant::now());
        log_line(&d.log, true, device, "orchestrator: back under supervision");
        Ok(())
    }

    /// Restart `device` now.
    pub fn restart(&mut self, device: &str) -> Result<(), String> {
        let d = self.find(device)?;
        if d.held {
            return Err(format!("{device} is attached elsewhere"));
        }
        if let Some(c) = d.child.take() {
            stop_child(c, Duration::from_secs(5));
        }
        d.backoff = BACKOFF_MIN;
        d.restart_at = Some(Instant::now());
        Ok(())
    }

    fn find(&mut self, device: &str) -> Result<&mut Device, String> {
        let names: Vec<String> = self.devices.iter().map(|d| d.spec.name.clone()).collect();
        self.devices
            .iter_mut()
            .find(|d| d.spec.name == device)
            .ok_or_else(|| format!("no device {device} (this VM has {})", names.join(", ")))
    }

    /// SIGTERM every backend, then SIGKILL what is left after `grace`;
    /// remove the sockets.
    pub fn shutdown(&mut self, grace: Duration) {
        self.stopping = true;
        for d in &mut self.devices {
            d.held = true;
            if let Some(c) = &d.child {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + grace;
        for d in &mut self.devices {
            if let Some(mut c) = d.child.take() {
                loop {
                    match c.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) if Instant::now() >= deadline => {
                            let _ = c.kill();
                            let _ = c.wait();
                            break;
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
            let _ = std::fs::remove_file(&d.socket);
            let _ = std::fs::remove_file(&d.notify_path);
            // A share's session file: nothing to resume once the VM is down.
            for a in &d.spec.args {
                if let Some(p) = a.strip_prefix("--state-file=") {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        let _ = std::fs::remove_file(self.state.status_file());
        let _ = std::fs::remove_file(self.state.root.join("control.sock"));
    }

    fn write_status(&mut self) {
        self.status.devices = self
            .devices
            .iter()
            .map(|d| DeviceStatus {
                device: d.spec.name.clone(),
                pid: d.child.as_ref().map(Child::id),
                state: if d.child.is_some() && d.quick_deaths < CRASH_LOOP {
                    "running".into()
                } else if !d.held && d.quick_deaths >= CRASH_LOOP {
                    "crash-loop".into()
                } else if d.child.is_some() {
                    "running".into()
                } else if d.held && d.restart_at.is_none() && !self.stopping {
                    "attached".into()
                } else if d.held {
                    "stopped".into()
                } else {
                    "restarting".into()
                },
                restarts: d.restarts,
                started_at: d.started_at,
                last_error: d.last_error.clone(),
                last_down_ms: d.last_down.map(|t| t.as_millis() as u64),
                socket: d.socket.clone(),
                command: d.spec.command_line(),
            })
            .collect();
        if let Err(e) = self.status.write(&self.state.status_file()) {
            eprintln!("orchestrator: cannot write the status file: {e}");
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(5));
    }
}

/// SIGTERM, then SIGKILL after `grace`; reap.
fn stop_child(mut c: Child, grace: Duration) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    loop {
        match c.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if Instant::now() >= deadline => {
                let _ = c.kill();
                let _ = c.wait();
                return;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Start the device's process with its listening socket at [`LISTEN_FD`].
fn spawn(d: &mut Device, echo: bool) -> Result<(), SuperviseError> {
    let listen = d.listener.as_ref().map(|l| l.as_raw_fd());
    let extra: Vec<(RawFd, RawFd)> = d
        .spec
        .pass_fds
        .iter()
        .map(|(fd, at)| (fd.as_raw_fd(), *at))
        .collect();
    if let Some(p) = &d.spec.ready_path {
        // The dead helper's socket: ready means the new one made its own.
        let _ = std::fs::remove_file(p);
    }
    let mut cmd = Command::new(&d.spec.program);
    cmd.args(&d.spec.args);
    if listen.is_some() {
        cmd.arg(format!("--fd={LISTEN_FD}"));
    }
    cmd.env("NOTIFY_SOCKET", &d.notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only async-signal-safe calls (dup2,
    // fcntl, prctl, sigprocmask) on descriptors this process owns.
    unsafe {
        cmd.pre_exec(move || {
            crate::unblock_signals_in_child()?;
            match listen {
                Some(LISTEN_FD) => {
                    let flags = libc::fcntl(LISTEN_FD, libc::F_GETFD);
                    if flags < 0
                        || libc::fcntl(LISTEN_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Some(fd) if libc::dup2(fd, LISTEN_FD) < 0 => {
                    return Err(std::io::Error::last_os_error());
                }
                _ => {}
            }
            for &(fd, at) in &extra {
                if fd == at {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(fd, at) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Its own session, with no controlling terminal: a Ctrl-C at
            // the terminal is for the orchestrator (which brings everything
            // down in order), not for each backend at once, and a backend
            // cannot reach the user's terminal (no /dev/tty, no TIOCSTI).
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A backend never outlives its orchestrator.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| SuperviseError::Io {
        device: d.spec.name.clone(),
        what: "starting it",
        source,
    })?;
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let log = Arc::clone(&d.log);
        let name = d.spec.name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                log_line(&log, echo, &name, &line);
            }
        });
    }
    d.child = Some(child);
    d.started = Instant::now();
    d.started_at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|t| t.as_secs())
        .unwrap_or(0);
    Ok(())
}

fn log_line(log: &Mutex<File>, echo: bool, name: &str, line: &str) {
    if let Ok(mut f) = log.lock() {
        let _ = writeln!(f, "{line}");
    }
    if echo {
        eprintln!("[{name}] {line}");
    }
}

/// Wait for READY=1 on the device's notify socket (a helper: for its
/// socket to appear).
fn wait_ready(d: &mut Device) -> Result<(), SuperviseError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let not_ready = |d: &Device, why: String| SuperviseError::NotReady {
        device: d.spec.name.clone(),
        why,
        log: d.log_path.display().to_string(),
        tail: tail(&d.log_path, 20),
    };
    let _ = d.notify.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 256];
    loop {
        let ready = match &d.spec.ready_path {
            Some(p) => {
                std::thread::sleep(Duration::from_millis(20));
                p.exists()
            }
            None => d.notify.recv(&mut buf).is_ok_and(|n| {
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
            }),
        };
        if ready {
            return Ok(());
        }
        if let Some(c) = &mut d.child {
            if let Ok(Some(status)) = c.try_wait() {
                // Give the log threads a moment to write its last words.
                std::thread::sleep(Duration::from_millis(100));
                return Err(not_ready(d, format!("it exited ({status})")));
            }
        }
        if Instant::now() >= deadline {
            let what = match &d.spec.ready_path {
                Some(p) => format!("no socket at {} within {READY_TIMEOUT:?}", p.display()),
                None => format!("no READY=1 within {READY_TIMEOUT:?}"),
            };
            return Err(not_ready(d, what));
        }
    }
}

/// A helper's socket, or READY=1 on the device's notify socket, without
/// waiting.
fn ready_now(d: &Device) -> bool {
    if let Some(p) = &d.spec.ready_path {
        return p.exists();
    }
    let mut buf = [0u8; 256];
    // SAFETY: recv into a local buffer of the length given.
    let n = unsafe {
        libc::recv(
            d.notify.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    n > 0
        && String::from_utf8_lossy(&buf[..n as usize])
            .lines()
            .any(|l| l == "READY=1")
}

/// The last non-empty line of a log that is not the supervisor's own.
fn last_line(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.starts_with("orchestrator: "))
        .map(|l| l.chars().take(300).collect())
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A helper device that runs `script` (sh) and is ready once it has
    /// made its ready file.
    fn helper(dir: &Path, name: &str, script: &str) -> DeviceSpec {
        DeviceSpec {
            name: name.into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ready_path: Some(dir.join(format!("{name}.ready"))),
            ..Default::default()
        }
    }

    fn poll_until(sup: &mut Supervisor, what: &str, done: impl Fn(&Supervisor) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done(sup) {
            assert!(Instant::now() < deadline, "{what}");
            sup.poll();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_backend_that_dies_at_once_is_reported_crashing_in_a_loop() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::acquire_in(&dir.path().join("vmm"), "t").unwrap();
        let mut sup = Supervisor::new(state, "qemu", false);
        let ready = dir.path().join("bad.ready");
        let script = format!(
            "echo 'boom: the image is gone' >&2; touch {}; exit 3",
            ready.display()
        );
        sup.add(helper(dir.path(), "bad", &script)).unwrap();
        poll_until(&mut sup, "never in a crash loop", |s| {
            s.status.devices.iter().any(|d| d.state == "crash-loop")
        });
        let d = &sup.status.devices[0];
        let err = d.last_error.as_deref().unwrap_or_default();
        assert!(
            err.contains("exit status: 3") && err.contains("boom: the image is gone"),
            "{err}"
        );
        let log = std::fs::read_to_string(sup.state.log("bad")).unwrap();
        assert!(log.contains("bad is crashing in a loop"), "{log}");
        // The delay doubled with each quick death.
        assert!(
            log.contains("restarting in 200ms") && log.contains("restarting in 400ms"),
            "{log}"
        );
    }

    #[test]
    fn a_backend_that_served_a_while_restarts_at_once_and_its_down_time_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::acquire_in(&dir.path().join("vmm"), "t").unwrap();
        let mut sup = Supervisor::new(state, "qemu", false);
        let ready = dir.path().join("good.ready");
        let script = format!("touch {}; exec sleep 1000", ready.display());
        sup.add(helper(dir.path(), "good", &script)).unwrap();
        for round in 1..=3u32 {
            // It serves past the healthy mark, then dies.
            std::thread::sleep(HEALTHY + Duration::from_millis(100));
            let pid = sup.devices[0].child.as_ref().unwrap().id();
            // SAFETY: killing the helper this test started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            poll_until(&mut sup, "not restarted", |s| {
                s.devices[0].restarts == round
                    && s.devices[0].last_down.is_some()
                    && s.devices[0].down_since.is_none()
            });
            let d = &sup.status.devices[0];
            assert_eq!(d.state, "running");
            assert!(d.last_down_ms.is_some_and(|ms| ms < 5000), "{d:?}");
        }
        let log = std::fs::read_to_string(sup.state.log("good")).unwrap();
        // Every kill came after a healthy run: no delay each time.
        assert_eq!(log.matches("restarting now").count(), 3, "{log}");
        assert!(log.contains("ready again; it was down"), "{log}");
    }
}
