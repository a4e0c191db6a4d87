//! A vhost-user virtio-blk backend over raw disk images.
//!
//! Not implemented yet: this binary only reports that, so nothing can mistake
//! it for a working device. The work is tracked in issue #4.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("blk-backend: not implemented yet (tracked in issue #4); nothing was started");
    ExitCode::from(2)
}
