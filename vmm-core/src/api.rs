//! The control API: JSON over a Unix socket, one request per line, one
//! reply per line.
//!
//! ```text
//! {"command":"status"}    -> {"ok":true,"state":"running","vcpus":2,"memory_mib":512,"devices":[...]}
//! {"command":"pause"}     -> {"ok":true,"state":"paused"}
//! {"command":"resume"}    -> {"ok":true,"state":"running"}
//! {"command":"shutdown"}  -> {"ok":true,"state":"shutting down"}   (vmm-core then exits 0)
//! anything else           -> {"ok":false,"error":"..."}
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::machine::Control;

/// What `status` reports besides the run state.
#[derive(Debug, Clone)]
pub struct VmInfo {
    pub vcpus: u8,
    pub memory: u64,
    pub devices: Vec<DeviceInfo>,
}

/// One vhost-user device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// fs, blk or net.
    pub kind: &'static str,
    pub socket: PathBuf,
    /// Times the device reconnected to a restarted backend.
    pub reconnects: Arc<std::sync::atomic::AtomicU64>,
}

/// How long `pause` waits for every vCPU to stop.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Listen on `path` (a stale socket left by a dead vmm-core is replaced;
/// a live one is an error) and serve requests on a thread of their own.
/// The listener thread puts itself (and so the connection threads it
/// starts) under the API role's seccomp filter.
pub fn serve(
    path: &Path,
    control: Arc<Control>,
    info: VmInfo,
    seccomp: backend_common::seccomp::Action,
) -> std::io::Result<()> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is served by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::install(crate::seccomp::Role::Api, seccomp) {
                tracing::error!("{e}; the control API is off");
                return;
            }
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let control = Arc::clone(&control);
                let info = info.clone();
                let _ = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || connection(conn, &control, &info));
            }
        })?;
    Ok(())
}

fn connection(conn: UnixStream, control: &Control, info: &VmInfo) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let reply = answer(&line, control, info);
        if writeln!(out, "{reply}").is_err() {
            break;
        }
    }
}

fn state(control: &Control) -> &'static str {
    if control.is_paused() {
        "paused"
    } else {
        "running"
    }
}

/// The reply to one request line.
pub fn answer(line: &str, control: &Control, info: &VmInfo) -> Value {
    let fail = |e: String| json!({"ok": false, "error": e});
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return fail(format!(
                "not JSON ({e}); send e.g. {{\"command\":\"status\"}}"
            ))
        }
    };
    let Some(cmd) = req.get("command").and_then(Value::as_str) else {
        return fail("no \"command\" (status, pause, resume, shutdown)".into());
    };
    match cmd {
        "status" => json!({
            "ok": true,
            "state": state(control),
            "vcpus": info.vcpus,
            "memory_mib": info.memory >> 20,
            "devices": info.devices.iter().map(|d| json!({
                "kind": d.kind,
                "socket": d.socket.display().to_string(),
                "reconnects": d.reconnects.load(std::sync::atomic::Ordering::Relaxed),
            })).collect::<Vec<_>>(),
        }),
        "pause" => match control.pause(PAUSE_TIMEOUT) {
            Ok(()) => json!({"ok": true, "state": "paused"}),
            Err(e) => fail(e),
        },
        "resume" => {
            control.resume();
            json!({"ok": true, "state": "running"})
        }
        "shutdown" => {
            control.shutdown();
            json!({"ok": true, "state": "shutting down"})
        }
        "reconnect" => fail(
            "devices reconnect by themselves when their backend hangs up; \
             there is nothing to ask for"
                .into(),
        ),
        other => fail(format!(
            "unknown command `{other}` (status, pause, resume, shutdown)"
        )),
    }
}
