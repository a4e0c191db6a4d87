//! A small QMP client: QEMU's JSON control protocol on a Unix socket, for
//! the VMM's own view of the VM in `orchestrator status`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Run one QMP command and return its `return` value.
pub fn execute(socket: &Path, command: &str) -> Result<serde_json::Value, String> {
    let s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    let t = Some(Duration::from_secs(3));
    s.set_read_timeout(t).map_err(|e| e.to_string())?;
    s.set_write_timeout(t).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut w = s;
    let mut next = || -> Result<serde_json::Value, String> {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("QMP closed the connection".into());
            }
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| format!("QMP sent `{line}`: {e}"))?;
            // Events come unasked; skip them.
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    let greeting = next()?;
    if greeting.get("QMP").is_none() {
        return Err(format!("not a QMP greeting: {greeting}"));
    }
    for cmd in ["qmp_capabilities", command] {
        writeln!(w, "{}", serde_json::json!({ "execute": cmd })).map_err(|e| e.to_string())?;
        let reply = next()?;
        if let Some(e) = reply.get("error") {
            return Err(format!("QMP {cmd}: {e}"));
        }
        if cmd == command {
            return reply
                .get("return")
                .cloned()
                .ok_or_else(|| format!("QMP {cmd}: no return in {reply}"));
        }
    }
    unreachable!("the loop returns on its last command")
}

/// The VMM's run state: QEMU's over QMP at `socket`, or vmm-core's over
/// its control API (`api.sock` beside it) when no QEMU answers there.
/// Also says which it was: "QMP" or "control API".
pub fn vmm_state(socket: &Path) -> Result<(String, &'static str), String> {
    match run_state(socket) {
        Ok(s) => Ok((s, "QMP")),
        Err(qmp_err) => vmm_core_state(&socket.with_file_name("api.sock"))
            .map(|s| (s, "control API"))
            .map_err(|_| qmp_err),
    }
}

/// vmm-core's run state from its control API (`running`, `paused`).
pub fn vmm_core_state(api: &Path) -> Result<String, String> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(api)
        .map_err(|e| format!("{}: {e}", api.display()))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    writeln!(s, "{{\"command\":\"status\"}}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
    v.get("state")
        .and_then(|s| s.as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("status returned {v}"))
}

/// The run state QEMU reports (`running`, `paused`, `shutdown`, ...).
pub fn run_state(socket: &Path) -> Result<String, String> {
    let v = execute(socket, "query-status")?;
    v.get("status")
        .and_then(|s| s.as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("query-status returned {v}"))
}
