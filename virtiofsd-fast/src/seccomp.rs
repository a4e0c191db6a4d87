//! The syscalls virtiofsd-fast makes once it serves: the shared backend
//! runtime plus what fuse-backend-rs's passthrough filesystem does on the
//! guest's behalf. Found by tracing the daemon under the protocol and guest
//! tests and by reading the passthrough code for paths a root guest does not
//! take (credential switches, CAP_FSETID juggling, xattrs), then widened
//! only to the calls a different libc picks for the same function (`*v2`
//! I/O, the fd-based xattr calls). fuse-backend-rs 0.14's passthrough does
//! not implement ioctl, locks or copy_file_range, so `flock` and
//! `copy_file_range` are left out until it does.
//!
//! x86_64 syscall numbers.

use libc::c_long;

/// The full allowlist for [`backend_common::seccomp::install`].
pub fn allowlist() -> Vec<c_long> {
    let mut v = backend_common::seccomp::COMMON.to_vec();
    v.extend_from_slice(PASSTHROUGH);
    v.sort_unstable();
    v.dedup();
    v
}

const PASSTHROUGH: &[c_long] = &[
    // Naming inodes: by O_PATH descriptor, or by file handle on the mount
    // found in /proc/self/mountinfo.
    libc::SYS_openat,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstatfs,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_dup,
    // Data.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // Metadata and the namespace.
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat2,
    libc::SYS_umask,
    // Extended attributes: fuse-backend-rs uses the path calls on
    // /proc/self/fd/N, since an O_PATH descriptor refuses the f* calls.
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_getxattr,
    libc::SYS_setxattr,
    libc::SYS_listxattr,
    libc::SYS_removexattr,
    // Acting as the guest's user: per-thread credential switches (raw
    // syscalls, not glibc's process-wide ones), and CAP_FSETID dropped and
    // raised around writes so they clear setuid bits as the guest expects.
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_capget,
    libc::SYS_capset,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_the_common_runtime() {
        let list = allowlist();
        for nr in backend_common::seccomp::COMMON {
            assert!(list.contains(nr), "{nr} missing");
        }
        assert!(list.contains(&libc::SYS_open_by_handle_at));
    }

    #[test]
    fn leaves_out_what_a_file_server_never_needs() {
        let list = allowlist();
        for nr in [
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_socket,
            libc::SYS_connect,
        ] {
            assert!(!list.contains(&nr), "{nr} allowed");
        }
    }
}
