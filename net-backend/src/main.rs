//! A vhost-user virtio-net backend over tap and socket back ends.
//!
//! Not implemented yet: this binary only reports that, so nothing can mistake
//! it for a working device. The work is tracked in issue #5.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("net-backend: not implemented yet (tracked in issue #5); nothing was started");
    ExitCode::from(2)
}
