//! vmm-core: a thin KVM VMM whose virtio devices are vhost-user backend
//! processes.
//!
//! What exists so far (issue 6 tracks the rest):
//! - [`memory`]: memfd-backed shared guest RAM with the 32-bit MMIO hole;
//! - [`cpu`]: real-mode and 64-bit long-mode vCPU set-up, CPUID;
//! - [`boot`]: direct boot of an ELF vmlinux or a bzImage with command
//!   line, initramfs and e820 map;
//! - [`machine`]: the KVM VM, one thread per vCPU, the 8250 UART, the
//!   i8042 reset and a debug-exit port;
//! - [`virtio_mmio`]: the virtio-mmio (version 2) register file, turned
//!   into calls on a device;
//! - [`vhost_user`]: that device as a vhost-user backend, with each queue's
//!   notify an ioeventfd and each interrupt an irqfd;
//! - [`acpi`]: RSDP, XSDT, FADT, MADT and a DSDT with the virtio devices;
//! - [`api`]: the control API (status, pause, resume, shutdown) on a Unix
//!   socket;
//! - [`seccomp`]: an allowlist per thread role.
//!
//! A backend that hangs up is reconnected when it serves again
//! ([`vhost_user::VhostUserDevice::reconnect`]), and handed the inflight
//! area its predecessor kept.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod cpu;
pub mod machine;
pub mod memory;
pub mod seccomp;
pub mod vhost_user;
pub mod virtio_mmio;
