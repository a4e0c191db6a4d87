//! Seccomp allowlists per thread role, installed by each thread on itself
//! once set-up is over (as Firecracker does): the VMM thread (and the
//! stdin reader), each vCPU thread, and the control API's threads. Read off
//! what each role calls, then checked by running the boot and device tests
//! under them. `ioctl` is allowed whole: the vCPU threads run KVM_RUN and,
//! when the guest starts a virtio device, register its ioeventfds and
//! irqfds on the VM.
//!
//! x86_64 syscall numbers.

use libc::c_long;

/// A thread's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The thread that set the VM up and then waits for it to stop; also
    /// the stdin reader feeding the UART.
    Vmm,
    /// A vCPU: KVM_RUN, the UART, and vhost-user messages when the guest
    /// drives a virtio-mmio device.
    Vcpu,
    /// The control API's listener and connection threads.
    Api,
    /// The thread that watches the backends' sockets and reconnects.
    Devices,
}

/// vhost-user messages (with descriptors) to the backends.
const VHOST_USER: &[c_long] = &[
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

const VCPU: &[c_long] = &[libc::SYS_ioctl, libc::SYS_eventfd2];

/// A new connection to a restarted backend (then [`VHOST_USER`] replays).
const DEVICES: &[c_long] = &[libc::SYS_socket, libc::SYS_connect];

const API: &[c_long] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    // A thread per connection.
    libc::SYS_clone,
    libc::SYS_clone3,
];

/// The allowlist for `role`.
pub fn allowlist(role: Role) -> Vec<c_long> {
    let mut v = backend_common::seccomp::RUNTIME.to_vec();
    match role {
        Role::Vmm => {}
        Role::Vcpu => {
            v.extend_from_slice(VCPU);
            v.extend_from_slice(VHOST_USER);
        }
        Role::Api => v.extend_from_slice(API),
        Role::Devices => {
            v.extend_from_slice(DEVICES);
            v.extend_from_slice(VHOST_USER);
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// Install `role`'s filter on the calling thread.
pub fn install(role: Role, action: backend_common::seccomp::Action) -> Result<(), String> {
    backend_common::seccomp::install_thread(&allowlist(role), action)
        .map_err(|e| format!("seccomp filter for the {role:?} thread: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `f` in a forked child; its wait status.
    fn in_child(f: impl FnOnce() -> i32) -> libc::c_int {
        // SAFETY: the child only installs a filter, makes plain syscalls and
        // leaves with _exit; glibc makes malloc safe after fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = f();
            // SAFETY: leaves without running the test harness's handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    fn killed_by_sigsys(status: libc::c_int) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    #[test]
    fn a_forbidden_syscall_kills_and_an_allowed_one_does_not() {
        use backend_common::seccomp::Action;
        // A vCPU thread opening a socket, the API thread calling ioctl:
        // each outside its role's list.
        let vcpu_socket = in_child(|| {
            if install(Role::Vcpu, Action::Kill).is_err() {
                return 2;
            }
            // SAFETY: a plain syscall the filter must stop.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            0
        });
        assert!(killed_by_sigsys(vcpu_socket), "status {vcpu_socket:#x}");
        let api_ioctl = in_child(|| {
            if install(Role::Api, Action::Kill).is_err() {
                return 2;
            }
            // SAFETY: as above.
            unsafe { libc::ioctl(0, libc::FIONREAD, std::ptr::null_mut::<libc::c_int>()) };
            0
        });
        assert!(killed_by_sigsys(api_ioctl), "status {api_ioctl:#x}");
        let vcpu_ioctl = in_child(|| {
            if install(Role::Vcpu, Action::Kill).is_err() {
                return 2;
            }
            let mut n: libc::c_int = 0;
            // SAFETY: as above; allowed for a vCPU.
            unsafe { libc::ioctl(0, libc::FIONREAD, &mut n) };
            0
        });
        assert!(
            libc::WIFEXITED(vcpu_ioctl) && libc::WEXITSTATUS(vcpu_ioctl) == 0,
            "status {vcpu_ioctl:#x}"
        );
    }

    #[test]
    fn roles_get_only_what_they_use() {
        let vcpu = allowlist(Role::Vcpu);
        let api = allowlist(Role::Api);
        let vmm = allowlist(Role::Vmm);
        assert!(vcpu.contains(&libc::SYS_ioctl));
        assert!(
            !api.contains(&libc::SYS_ioctl),
            "the API thread has no KVM business"
        );
        assert!(!vmm.contains(&libc::SYS_ioctl));
        assert!(api.contains(&libc::SYS_accept4) && !vcpu.contains(&libc::SYS_accept4));
        for list in [&vcpu, &api, &vmm] {
            for nr in [
                libc::SYS_execve,
                libc::SYS_openat,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_ptrace,
                libc::SYS_mount,
            ] {
                assert!(!list.contains(&nr), "{nr} allowed");
            }
        }
    }
}
