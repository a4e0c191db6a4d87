//! The real-guest test bed: Debian's kernel with the project's busybox initramfs under QEMU,
//! with vhost-user devices served by the backends under test. The launcher itself is
//! [`orchestrator::qemu`] (the orchestrator runs guests the same way); this module adds the
//! peer backends tests start next to it.

pub mod peers;

pub use orchestrator::qemu::*;
