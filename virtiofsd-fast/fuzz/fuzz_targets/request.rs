//! Guest bytes in, one request served: every input is a descriptor chain on
//! a virtio-fs queue, split where its first byte says. Nothing may panic,
//! and every chain must come back to the guest.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use virtiofsd_fast::fuzz::Harness;

struct State {
    harness: Harness,
    _share: tempfile::TempDir,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let state = guard.get_or_insert_with(|| {
        let share = tempfile::tempdir().expect("a scratch share");
        std::fs::write(share.path().join("file"), b"data").expect("a file to find");
        let harness = Harness::new(share.path()).expect("the share is served");
        State { harness, _share: share }
    });
    assert!(state.harness.request(data).is_some(), "the chain did not come back");
});
