//! What vmm-core's test files share: the KVM check and a console to read.
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether /dev/kvm can be used; if not, says the test is skipped, and
/// under CI fails (no test passes there by skipping).
pub fn kvm() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            backend_common::skip_or_fail(&format!("/dev/kvm: {e}"));
            false
        }
    }
}

/// The guest's console, kept for the test to read.
#[derive(Clone, Default)]
pub struct Console(pub Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    /// Wait (10 s at most) until more than `n` bytes were printed.
    pub fn wait_longer_than(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.len() <= n {
            assert!(
                Instant::now() < deadline,
                "the program printed nothing more"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
