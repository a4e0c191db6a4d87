//! The syscalls blk-backend needs once it is serving.

use libc::c_long;

/// The allowlist: the common runtime plus image I/O.
pub fn allowlist() -> Vec<c_long> {
    let mut v = backend_common::seccomp::common();
    v.extend_from_slice(IMAGE_IO);
    v.sort_unstable();
    v.dedup();
    v
}

/// The ioctl requests blk-backend makes once it is serving: only the
/// runtime's. Block-device requests (BLKDISCARD, BLKZEROOUT, ...) stay out:
/// discard and write-zeroes go through fallocate.
pub fn ioctls() -> Vec<u32> {
    backend_common::seccomp::IOCTLS.to_vec()
}

const IMAGE_IO: &[c_long] = &[
    // The thread-pool engine.
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    // The io_uring engine (the ring itself is set up before the filter).
    libc::SYS_io_uring_enter,
    // Size checks for resizes.
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    // The file size limit follows the capacity (setrlimit is prlimit64).
    libc::SYS_prlimit64,
    // Whether guest memory is in huge pages (no bouncing then).
    libc::SYS_fstatfs,
    // The vhost-user message shim's private socket, one per frontend.
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    // The inflight area the shim makes for GET_INFLIGHT_FD.
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    // Engines waiting for completions while a frontend's I/O drains.
    libc::SYS_poll,
    libc::SYS_ppoll,
];

#[cfg(test)]
mod tests {
    use backend_common::seccomp::ioctl_is_refused;

    #[test]
    fn refuses_every_ioctl_but_its_own() {
        let (list, ioctls) = (super::allowlist(), super::ioctls());
        for req in [libc::TIOCSTI, libc::TIOCSCTTY, 0x1277 /* BLKDISCARD */] {
            assert!(
                ioctl_is_refused(&list, &ioctls, req as u32),
                "{req:#x} passes"
            );
        }
        assert!(!ioctl_is_refused(&list, &ioctls, libc::FIONBIO as u32));
    }

    #[test]
    fn compiles_and_holds_the_io_calls() {
        let list = super::allowlist();
        assert!(list.contains(&libc::SYS_io_uring_enter));
        assert!(list.contains(&libc::SYS_pwritev));
        assert!(
            !list.contains(&libc::SYS_openat),
            "no new files once serving"
        );
    }
}
