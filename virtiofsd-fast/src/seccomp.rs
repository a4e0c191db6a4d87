//! The syscalls virtiofsd-fast makes once it serves: the shared backend
//! runtime plus what the filesystem ([`crate::share`]) and its inode store
//! call on the guest's behalf. Read off the code (every host call there is a
//! named libc function or raw syscall), then checked by tracing the daemon
//! under the protocol and guest tests, and widened only to the calls a
//! different libc picks for the same function (`*v2` I/O, `faccessat2`).
//! Locks and ioctls are not served, so `flock` and `fcntl` locking stay
//! out, and `ioctl` passes only with the runtime's own requests.
//!
//! x86_64 syscall numbers.

use libc::c_long;

/// The full allowlist for [`backend_common::seccomp::install`].
pub fn allowlist() -> Vec<c_long> {
    let mut v = backend_common::seccomp::common();
    v.extend_from_slice(FILESYSTEM);
    v.sort_unstable();
    v.dedup();
    v
}

/// The ioctl requests virtiofsd-fast makes once it is serving: only the
/// runtime's (FUSE_IOCTL is not served).
pub fn ioctls() -> Vec<u32> {
    backend_common::seccomp::IOCTLS.to_vec()
}

const FILESYSTEM: &[c_long] = &[
    // Naming inodes: O_PATH descriptors, swapped for file handles past the
    // descriptor bound and reopened by handle.
    libc::SYS_openat,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_lseek,
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
    libc::SYS_syncfs,
    libc::SYS_copy_file_range,
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
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    // Extended attributes, on real (not O_PATH) descriptors.
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    // Acting as the guest's user: this thread's filesystem IDs only.
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_the_common_runtime() {
        let list = allowlist();
        for nr in &backend_common::seccomp::common() {
            assert!(list.contains(nr), "{nr} missing");
        }
        assert!(list.contains(&libc::SYS_open_by_handle_at));
    }

    #[test]
    fn refuses_every_ioctl_but_its_own() {
        use backend_common::seccomp::ioctl_is_refused;
        let (list, ioctls) = (allowlist(), super::ioctls());
        // TIOCSTI, and FS_IOC_SETFLAGS (chattr +i on a host file).
        for req in [libc::TIOCSTI as u32, 0x4008_6602] {
            assert!(ioctl_is_refused(&list, &ioctls, req), "{req:#x} passes");
        }
        assert!(!ioctl_is_refused(&list, &ioctls, libc::FIONBIO as u32));
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
