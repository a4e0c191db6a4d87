//! What blk-backend's test files share: a scratch image and the backend
//! started on it.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use tests::blk::BlkClient;
use tests::frontend::BackendProcess;

pub const IMAGE: u64 = 64 << 20;

pub fn image() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(IMAGE).unwrap();
    f
}

pub fn start(img: &Path, extra: &[&str]) -> BackendProcess {
    let mut argv = vec![
        env!("CARGO_BIN_EXE_blk-backend").to_string(),
        "--fd={fd}".into(),
        format!("--image={}", img.display()),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    BackendProcess::spawn(&argv, Duration::from_secs(10)).expect("blk-backend starts")
}

pub fn client(b: &mut BackendProcess, queues: usize, depth: usize) -> BlkClient {
    BlkClient::connect(b, queues, depth, 1 << 20).unwrap_or_else(|e| panic!("{e}\n{}", b.output()))
}
