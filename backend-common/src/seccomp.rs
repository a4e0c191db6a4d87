//! A syscall allowlist for a backend process, in the crosvm/Firecracker
//! manner: one flat list per device, installed once the process is set up
//! (sockets open, sandbox entered), so that the list only has to cover what
//! serving the guest needs.
//!
//! The syscall numbers are x86_64's (`libc::SYS_*`).

use std::collections::BTreeMap;

use libc::c_long;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Errors building or installing the filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp is not supported on {0}")]
    Arch(&'static str, #[source] seccompiler::BackendError),
    #[error("building the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("installing the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// What the kernel does with a syscall outside the allowlist (every
/// backend's `--seccomp` flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Action {
    /// Kill the whole process (SECCOMP_RET_KILL_PROCESS): a half-dead
    /// backend is worse than a restarted one.
    Kill,
    /// Allow it but have the kernel audit-log it (SECCOMP_RET_LOG): for
    /// finding what a list misses without breaking anything.
    Log,
    /// Install no filter at all.
    None,
}

/// Install a filter allowing only `allowed` on every thread of the process
/// (TSYNC), so threads the serve loop already started are covered too;
/// `ioctl` passes only with one of the request numbers in `ioctls` (add
/// [`IOCTLS`] for what every backend's runtime makes).
/// Sets `PR_SET_NO_NEW_PRIVS` first, which an unprivileged filter requires.
/// Irreversible; [`Action::None`] does nothing.
pub fn install(allowed: &[c_long], ioctls: &[u32], action: Action) -> Result<(), SeccompError> {
    let mismatch = match action {
        Action::Kill => SeccompAction::KillProcess,
        Action::Log => SeccompAction::Log,
        Action::None => return Ok(()),
    };
    let prog = compile_with_ioctls(allowed, ioctls, mismatch)?;
    // glibc's malloc counts the CPUs (opening /sys/devices/system/cpu/online)
    // the first time a thread needs a ninth arena; under a filter without
    // openat that kills the process. A fixed arena limit means it never asks.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc tunable.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 8)
    };
    // The default panic hook may resolve a backtrace (getcwd, open, ...),
    // which the filter kills: the process would die of SIGSYS with the
    // panic's message unprinted. Print the message and place only.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        eprintln!(
            "panic in thread {}: {info}",
            thread.name().unwrap_or("unnamed")
        );
    }));
    seccompiler::apply_filter_all_threads(&prog).map_err(SeccompError::Install)?;
    tracing::info!(
        syscalls = allowed.len(),
        ?action,
        "seccomp filter installed"
    );
    Ok(())
}

/// Install a filter allowing only `allowed` on the calling thread alone
/// (and the threads it starts from now on): for a process whose threads
/// have different roles, each with its own list.
pub fn install_thread(allowed: &[c_long], action: Action) -> Result<(), SeccompError> {
    let mismatch = match action {
        Action::Kill => SeccompAction::KillProcess,
        Action::Log => SeccompAction::Log,
        Action::None => return Ok(()),
    };
    let prog = compile(allowed, mismatch)?;
    seccompiler::apply_filter(&prog).map_err(SeccompError::Install)
}

fn compile(allowed: &[c_long], mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    compile_with_ioctls(allowed, &[], mismatch)
}

/// `allowed` outright (an empty rule chain allows a syscall whatever its
/// arguments), and `ioctl` only for the request numbers in `ioctls`. The
/// request is compared as the 32-bit number the kernel takes.
fn compile_with_ioctls(
    allowed: &[c_long],
    ioctls: &[u32],
    mismatch: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    let arch = std::env::consts::ARCH;
    let arch = TargetArch::try_from(arch).map_err(|e| SeccompError::Arch(arch, e))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed.iter().map(|&nr| (nr, Vec::new())).collect();
    if !ioctls.is_empty() {
        let by_request = ioctls
            .iter()
            .map(|&req| {
                let c = SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    u64::from(req),
                )?;
                SeccompRule::new(vec![c])
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(SeccompError::Build)?;
        rules.insert(libc::SYS_ioctl, by_request);
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(SeccompError::Build)?;
    BpfProgram::try_from(filter).map_err(SeccompError::Build)
}

/// Whether a process under this policy (`allowed`, `ioctls`, killing on a
/// mismatch) is killed when it makes ioctl `request`: checked in a forked
/// child, so a backend's tests can show its real policy refuses what it
/// must. The ioctl goes to a descriptor of /dev/null (what it would do
/// there does not matter: the filter decides before the call runs).
pub fn ioctl_is_refused(allowed: &[c_long], ioctls: &[u32], request: u32) -> bool {
    let null = match std::fs::File::open("/dev/null") {
        Ok(f) => f,
        Err(_) => return false,
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&null);
    let mut all = allowed.to_vec();
    // What the child needs to get from installing to _exit.
    all.extend_from_slice(&[
        libc::SYS_exit_group,
        libc::SYS_exit,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_write,
    ]);
    let prog = match compile_with_ioctls(&all, ioctls, SeccompAction::KillProcess) {
        Ok(p) => p,
        Err(_) => return false,
    };
    // SAFETY: the child only installs the filter, makes one ioctl and
    // _exits; glibc makes malloc safe after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return false;
    }
    if pid == 0 {
        let mut arg = [0u8; 64];
        if seccompiler::apply_filter(&prog).is_err() {
            // SAFETY: ends the child without unwinding into the parent's code.
            unsafe { libc::_exit(2) };
        }
        // SAFETY: `arg` has room for what any ioctl of a test writes.
        unsafe { libc::ioctl(fd, request as _, arg.as_mut_ptr()) };
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waitpid writes our own child's status into `status`.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
}

/// The ioctl requests every backend's runtime makes while it serves:
/// FIONBIO, which the standard library and vhost's listener use to make a
/// socket (non-)blocking. A backend adds its own device's requests; any
/// other request (TIOCSTI on a terminal, a block device's, KVM's) is
/// refused.
pub const IOCTLS: &[u32] = &[libc::FIONBIO as u32];

/// What any thread of the workspace's programs needs: the Rust runtime
/// (memory, locks, signals for abort, time) and plain descriptor work.
/// vmm-core's thread roles start from this; the backends add [`SERVING`].
pub const RUNTIME: &[c_long] = &[
    // Memory: the allocator, and guest memory mapped from SET_MEM_TABLE fds.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // Locks and thread bookkeeping.
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Thread names (PR_SET_NAME) and the kernel's no-new-privs query.
    libc::SYS_prctl,
    // Signals: stack overflow guards, pthread's signal masking around
    // clone, and abort() on panic.
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
    // Time, where the vDSO falls back to the kernel.
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    // Plain descriptor work.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_lseek,
    libc::SYS_fstat,
];

/// What a backend adds to [`RUNTIME`] to serve: threads (the vring workers
/// come and go with each frontend connection), the epoll and eventfd
/// machinery of vhost-user-backend, and the vhost-user socket (a new
/// frontend on the listener, messages with descriptors attached).
pub const SERVING: &[c_long] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
];

/// What any of the workspace's backends needs once it serves:
/// [`RUNTIME`] and [`SERVING`]. A device adds its own.
pub fn common() -> Vec<c_long> {
    let mut v = RUNTIME.to_vec();
    v.extend_from_slice(SERVING);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `f` in a forked child and return its wait status. The child
    /// reports through its exit code only: it must not unwind into the
    /// test harness it was forked from.
    fn in_child(f: impl FnOnce() -> i32) -> libc::c_int {
        // SAFETY: the child only calls `f`, which keeps to seccomp set-up and
        // plain syscalls, then _exit; glibc makes malloc safe after fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = f();
            // SAFETY: _exit ends the child without running the parent's
            // atexit handlers or destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waitpid writes the status of our own child into `status`.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
        status
    }

    /// What the child needs after installing: returning from install (which
    /// may free) and exiting.
    const TINY: &[c_long] = &[
        libc::SYS_exit_group,
        libc::SYS_exit,
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_write,
    ];

    fn getppid_under(allowed: &[c_long], action: Action) -> libc::c_int {
        in_child(|| {
            if install(allowed, &[], action).is_err() {
                return 2;
            }
            // SAFETY: getppid takes no arguments and cannot fail.
            unsafe { libc::getppid() };
            0
        })
    }

    fn exited_ok(status: libc::c_int) -> bool {
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }

    #[test]
    fn kill_ends_the_process_on_an_unlisted_syscall() {
        let status = getppid_under(TINY, Action::Kill);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "wait status {status:#x}"
        );
    }

    #[test]
    fn listed_syscalls_pass() {
        let mut allowed = TINY.to_vec();
        allowed.push(libc::SYS_getppid);
        let status = getppid_under(&allowed, Action::Kill);
        assert!(exited_ok(status), "wait status {status:#x}");
    }

    #[test]
    fn log_only_records() {
        let status = getppid_under(TINY, Action::Log);
        assert!(exited_ok(status), "wait status {status:#x}");
    }

    #[test]
    fn none_installs_nothing() {
        let status = getppid_under(&[], Action::None);
        assert!(exited_ok(status), "wait status {status:#x}");
    }

    /// Run `f` under `common()` plus `ioctls` (Kill) and report how it ended.
    fn ioctl_under(ioctls: &'static [u32], f: fn() -> libc::c_int) -> libc::c_int {
        in_child(move || {
            let mut allowed = common();
            allowed.extend_from_slice(TINY);
            if install(&allowed, ioctls, Action::Kill).is_err() {
                return 2;
            }
            if f() < 0 {
                return 3;
            }
            0
        })
    }

    #[test]
    fn only_the_listed_ioctls_pass() {
        fn fionbio() -> libc::c_int {
            let mut on: libc::c_int = 1;
            // SAFETY: FIONBIO reads an int; stderr is a valid descriptor.
            unsafe { libc::ioctl(2, libc::FIONBIO, &mut on) }
        }
        fn tiocsti() -> libc::c_int {
            let c = b'x';
            // SAFETY: TIOCSTI reads one byte; the call is refused anyway.
            unsafe { libc::ioctl(0, libc::TIOCSTI, &c) }
        }
        // FIONBIO on a pipe or file answers; what matters is that the
        // filter lets it through.
        let status = ioctl_under(IOCTLS, fionbio);
        assert!(
            libc::WIFEXITED(status),
            "FIONBIO was refused: wait status {status:#x}"
        );
        let status = ioctl_under(IOCTLS, tiocsti);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "TIOCSTI was let through: wait status {status:#x}"
        );
        // Without any listed request, no ioctl passes at all.
        let status = ioctl_under(&[], fionbio);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "wait status {status:#x}"
        );
    }

    #[test]
    fn common_list_compiles() {
        let prog = compile(&common(), SeccompAction::KillProcess).unwrap();
        assert!(!prog.is_empty());
    }
}
