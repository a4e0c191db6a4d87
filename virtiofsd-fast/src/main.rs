//! A vhost-user virtio-fs backend: fast, coherent, sandboxed.
//!
//! Not implemented yet: this binary only reports that, so nothing can mistake
//! it for a working device. The work is tracked in issue #3.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("virtiofsd-fast: not implemented yet (tracked in issue #3); nothing was started");
    ExitCode::from(2)
}
