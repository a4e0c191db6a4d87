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

/// What every role needs: the Rust runtime, locks, logging, time.
const BASE: &[c_long] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_prctl,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_lseek,
];

const VCPU: &[c_long] = &[
    libc::SYS_ioctl,
    // vhost-user messages (with descriptors) to the backends.
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
];

const DEVICES: &[c_long] = &[
    // A new connection to a restarted backend, and the replayed messages.
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

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
    let mut v = BASE.to_vec();
    v.extend_from_slice(match role {
        Role::Vmm => &[],
        Role::Vcpu => VCPU,
        Role::Api => API,
        Role::Devices => DEVICES,
    });
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
