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

/// The run state QEMU reports (`running`, `paused`, `shutdown`, ...).
pub fn run_state(socket: &Path) -> Result<String, String> {
    let v = execute(socket, "query-status")?;
    v.get("status")
        .and_then(|s| s.as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("query-status returned {v}"))
}
