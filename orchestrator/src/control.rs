//! The running orchestrator's control socket (`control.sock` in the VM's
//! state directory), used by `orchestrator restart` and `orchestrator
//! attach`. One request line per connection, one reply line:
//!
//! - `restart DEVICE` → `ok`
//! - `hold DEVICE` → `ok COMMAND-LINE-AS-JSON`, with the device's listening
//!   socket attached (SCM_RIGHTS); the device is no longer supervised.
//! - `release DEVICE` → `ok`; supervised (and started) again.
//!
//! Errors are `error: TEXT`.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::supervisor::Supervisor;

/// Serve the control socket at `path` on a thread of its own.
pub fn serve(path: &Path, supervisor: Arc<Mutex<Supervisor>>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            handle(stream, &supervisor);
        }
    });
    Ok(())
}

fn handle(stream: UnixStream, supervisor: &Mutex<Supervisor>) {
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return;
    }
    let mut words = line.split_whitespace();
    let (Some(verb), Some(device)) = (words.next(), words.next()) else {
        let _ = (&stream).write_all(b"error: expected `VERB DEVICE`\n");
        return;
    };
    let Ok(mut sup) = supervisor.lock() else {
        return;
    };
    let reply = match verb {
        "restart" => sup.restart(device).map(|()| None),
        "release" => sup.release(device).map(|()| None),
        "hold" => sup.hold(device).map(Some),
        _ => Err(format!("unknown request `{verb}`")),
    };
    drop(sup);
    match reply {
        Ok(None) => {
            let _ = (&stream).write_all(b"ok\n");
        }
        Ok(Some((fd, cmd))) => {
            let text = format!("ok {}\n", serde_json::to_string(&cmd).unwrap_or_default());
            let fds = [fd.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let iov = [IoSlice::new(text.as_bytes())];
            let _ = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None);
        }
        Err(e) => {
            let _ = (&stream).write_all(format!("error: {e}\n").as_bytes());
        }
    }
}

/// Send one request; returns the reply after `ok` and any descriptor.
pub fn request(path: &Path, verb: &str, device: &str) -> Result<(String, Option<OwnedFd>), String> {
    let stream = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the orchestrator at {} ({e}); is the VM running (`orchestrator status`)?",
            path.display()
        )
    })?;
    (&stream)
        .write_all(format!("{verb} {device}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 64 << 10];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let (n, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .map_err(|e| e.to_string())?;
        let mut fd = None;
        for c in msg.cmsgs().map_err(|e| e.to_string())? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: a descriptor just received is ours alone.
                fd = fds.first().map(|&f| unsafe { OwnedFd::from_raw_fd(f) });
            }
        }
        (msg.bytes, fd)
    };
    let text = String::from_utf8_lossy(&buf[..n]).trim_end().to_string();
    match text.strip_prefix("ok") {
        Some(rest) => Ok((rest.trim().to_string(), fd)),
        None => Err(text.strip_prefix("error: ").unwrap_or(&text).to_string()),
    }
}
