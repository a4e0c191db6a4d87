//! Readiness, the systemd way: when `$NOTIFY_SOCKET` is set, send
//! `READY=1` there once the backend serves. systemd units use it
//! (`Type=notify`), and so does the orchestrator, so neither waits on a
//! fixed sleep.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;

/// A connected notification socket.
pub struct Notifier(UnixDatagram);

impl Notifier {
    /// Connect to `$NOTIFY_SOCKET`, if set. Connect early: the sandbox may
    /// hide the socket's path later, the connected descriptor keeps working.
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let sock = UnixDatagram::unbound().ok()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let connected = if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.connect_addr(&a))
        } else {
            sock.connect(&path)
        };
        match connected {
            Ok(()) => Some(Notifier(sock)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach NOTIFY_SOCKET; readiness will not be reported");
                None
            }
        }
    }

    /// The descriptor, for a sandbox that closes all others.
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Report readiness.
    pub fn ready(&self) {
        if let Err(e) = self.0.send(b"READY=1\n") {
            tracing::warn!(error = %e, "cannot report readiness");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ready_reaches_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // SAFETY: tests in this crate do not read NOTIFY_SOCKET concurrently.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        let n = super::Notifier::from_env().expect("connects");
        // SAFETY: as above.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        n.ready();
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\n");
    }
}
