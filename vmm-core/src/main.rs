//! A thin KVM VMM whose virtio devices are all vhost-user backend processes.
//!
//! Not implemented yet: this binary only reports that, so nothing can mistake
//! it for a working device. The work is tracked in issue #6.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("vmm-core: not implemented yet (tracked in issue #6); nothing was started");
    ExitCode::from(2)
}
