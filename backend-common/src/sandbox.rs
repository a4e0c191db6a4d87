//! Process sandboxing shared by the backends: namespaces, a root that holds
//! only what the device needs, and capabilities cut to a short list.
//!
//! Order matters and is the caller's: open what must come from outside
//! (sockets) first, then `enter_namespaces`, then `pivot_into_jail` or
//! `chroot_into`, then `drop_capabilities`, then seccomp.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Errors while building the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{what} failed{hint}")]
    Sys {
        what: &'static str,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("path {0:?} contains a NUL byte")]
    Path(std::path::PathBuf),
}

const NEED_ROOT: &str =
    " (the namespace sandbox needs root or CAP_SYS_ADMIN; use --sandbox=chroot or --sandbox=none)";

fn sys(what: &'static str, rc: libc::c_int) -> Result<(), SandboxError> {
    if rc < 0 {
        let source = std::io::Error::last_os_error();
        let hint = if source.raw_os_error() == Some(libc::EPERM) {
            NEED_ROOT
        } else {
            ""
        };
        return Err(SandboxError::Sys { what, hint, source });
    }
    Ok(())
}

fn cpath(p: &Path) -> Result<CString, SandboxError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| SandboxError::Path(p.to_path_buf()))
}

/// New mount, pid, network and IPC namespaces. The pid namespace only
/// applies to children, so this forks: the parent stays outside, waits for
/// the child and exits with its status (it never returns); the child, pid 1
/// of the new namespace, returns. Call while the process has one thread.
///
/// The child also gets a fresh /proc for its pid namespace, mounted over
/// /proc in its private mount namespace (the host's mounts are untouched).
/// Both sides keep the descriptors opened before, such as a listening
/// socket; only the child uses them.
pub fn enter_namespaces() -> Result<(), SandboxError> {
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET | libc::CLONE_NEWIPC;
    // SAFETY: unshare takes no pointers.
    sys("unshare(mount, pid, net, ipc)", unsafe {
        libc::unshare(flags)
    })?;
    // SAFETY: the process is single-threaded here (the caller's contract), so
    // the child may keep running Rust code after fork.
    let pid = unsafe { libc::fork() };
    sys("fork into the pid namespace", pid)?;
    if pid > 0 {
        supervise_child(pid);
    }
    // Die with the parent, which stands for us outside the namespace.
    // SAFETY: prctl with integer arguments only.
    sys("prctl(PDEATHSIG)", unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL)
    })?;
    // Nothing we mount may propagate back to the host.
    // SAFETY: null source/fstype/data are allowed for a propagation change.
    sys("making mounts private", unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    // SAFETY: constant C strings; no data argument.
    sys("mounting /proc for the pid namespace", unsafe {
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    })?;
    Ok(())
}

/// The parent side of `enter_namespaces`: forward termination to the child
/// (pid 1 ignores signals it has no handler for, so it gets SIGKILL; the
/// backends are crash-only) and exit with the child's status.
fn supervise_child(child: libc::pid_t) -> ! {
    // SAFETY: sigset operations on a local, zero-initialised set.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the set is valid for these calls.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local.
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r == child {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            std::process::exit(code);
        }
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait reads the set and writes the signal number.
        unsafe { libc::sigwait(&set, &mut sig) };
        if sig != libc::SIGCHLD {
            // SAFETY: kill takes integers only.
            unsafe { libc::kill(child, libc::SIGKILL) };
        }
    }
}

/// Where the share appears inside the jail built by [`pivot_into_jail`].
pub const JAIL_SHARE: &str = "/share";

/// Make a fresh, read-only tmpfs the root of the process, holding only
/// `dir` (bind-mounted at [`JAIL_SHARE`]) and this pid namespace's /proc.
/// Nothing else of the host is reachable by path afterwards. Descriptors
/// opened before stay valid. Needs `enter_namespaces` first.
///
/// /proc stays inside because virtiofsd-fast reopens files through
/// /proc/self/fd, which must describe the process as it is after the pivot.
pub fn pivot_into_jail(dir: &Path) -> Result<(), SandboxError> {
    jail(Some(dir))
}

/// Make a fresh, read-only, empty tmpfs the root of the process: no share,
/// no /proc. For a backend that works only on descriptors it opened before
/// (a disk image, a tap). Needs `enter_namespaces` first.
pub fn pivot_into_empty_jail() -> Result<(), SandboxError> {
    jail(None)
}

fn jail(dir: Option<&Path>) -> Result<(), SandboxError> {
    // Take a detached copy of the share's mount tree before the tmpfs
    // exists: the tmpfs may be mounted over the share itself or below it
    // (a share of /tmp, or of /), and must not appear inside it.
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    let tree = match dir {
        Some(dir) => {
            let d = cpath(dir)?;
            let flags = OPEN_TREE_CLONE
                | libc::O_CLOEXEC as libc::c_uint
                | libc::AT_RECURSIVE as libc::c_uint;
            // SAFETY: valid C string; the result is checked.
            let tree =
                unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, d.as_ptr(), flags) }
                    as libc::c_int;
            sys(
                "cloning the share's mount tree (open_tree, Linux 5.2+)",
                tree,
            )?;
            // The guest can make device nodes and set-user-ID files in the
            // share: inside the jail none of them work as such, on every
            // mount of the tree (the host's own mounts are not touched).
            if let Err(e) = forbid_devices_and_setuid(tree) {
                // SAFETY: `tree` is ours and not used again.
                unsafe { libc::close(tree) };
                return Err(e);
            }
            Some(tree)
        }
        None => None,
    };
    let base = ["/tmp", "/run", "/mnt"]
        .into_iter()
        .find(|p| Path::new(p).is_dir())
        .unwrap_or("/tmp");
    let base_c = cpath(Path::new(base))?;
    // SAFETY: valid C strings; the data string is a valid C string too.
    sys("mounting the jail's tmpfs", unsafe {
        libc::mount(
            c"jail".as_ptr(),
            base_c.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0755,size=64k".as_ptr().cast(),
        )
    })?;
    if let Some(tree) = tree {
        let share_in = cpath(&Path::new(base).join("share"))?;
        let proc_in = cpath(&Path::new(base).join("proc"))?;
        for p in [&share_in, &proc_in] {
            // SAFETY: valid C string.
            sys("creating a jail directory", unsafe {
                libc::mkdir(p.as_ptr(), 0o755)
            })?;
        }
        // SAFETY: `tree` is the detached mount from open_tree; empty path
        // with F_EMPTY_PATH moves that mount itself; the target is a valid
        // C string.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree,
                c"".as_ptr(),
                libc::AT_FDCWD,
                share_in.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        } as libc::c_int;
        // SAFETY: `tree` is ours; the mount stays attached after the close.
        unsafe { libc::close(tree) };
        sys("attaching the share in the jail (move_mount)", rc)?;
        // Only what the daemon uses, /proc/self/fd: `subset=pid` (Linux
        // 5.8+) leaves out everything that is not a process's directory
        // (/proc/sys, /proc/sysrq-trigger, ...), which a root daemon could
        // otherwise write; read-only on top.
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY;
        // SAFETY: constant C strings; the data argument is a C string.
        let rc = unsafe {
            libc::mount(
                c"proc".as_ptr(),
                proc_in.as_ptr(),
                c"proc".as_ptr(),
                flags,
                c"subset=pid,hidepid=invisible".as_ptr().cast(),
            )
        };
        sys("mounting /proc (subset=pid, Linux 5.8+) in the jail", rc)?;
    }
    // SAFETY: valid C string.
    sys("chdir into the jail", unsafe {
        libc::chdir(base_c.as_ptr())
    })?;
    // pivot_root(".", ".") stacks the old root on top of the new one; the
    // detach below then leaves just the jail.
    // SAFETY: valid C strings.
    sys("pivot_root", unsafe {
        libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int
    })?;
    // SAFETY: valid C string.
    sys("detaching the old root", unsafe {
        libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
    })?;
    // SAFETY: valid C string.
    sys("chdir /", unsafe { libc::chdir(c"/".as_ptr()) })?;
    // SAFETY: null source/fstype/data are allowed for a remount.
    sys("making the jail read-only", unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    })?;
    Ok(())
}

/// Set `nodev` and `nosuid` on every mount of the detached tree `tree`
/// (mount_setattr, Linux 5.12+).
fn forbid_devices_and_setuid(tree: libc::c_int) -> Result<(), SandboxError> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `tree` is a mount descriptor from open_tree, the empty path
    // with AT_EMPTY_PATH names it, and `attr` is a valid mount_attr of the
    // size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree,
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    } as libc::c_int;
    sys(
        "making the share nodev,nosuid in the jail (mount_setattr, Linux 5.12+)",
        rc,
    )
}

/// Close every descriptor except stdin, stdout, stderr and `keep`, so the
/// process holds nothing it inherited by accident. Reads /proc/self/fd, so
/// call it before /proc goes away.
pub fn close_other_fds(keep: &[std::os::fd::RawFd]) -> Result<(), SandboxError> {
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|source| SandboxError::Sys {
        what: "listing /proc/self/fd",
        hint: "",
        source,
    })?;
    // Collect first: the directory's own descriptor is in the listing.
    let fds: Vec<std::os::fd::RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor nothing else in this process
            // refers to by construction (it is not in `keep`); EBADF for the
            // listing's own, already closed, descriptor is harmless.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// The sandbox of a backend that works only on descriptors it opened
/// before (a disk image, a tap): every such backend's `--sandbox` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Confinement {
    /// New mount, pid, net and ipc namespaces; the root is an empty
    /// read-only tmpfs, so nothing but the descriptors it holds is
    /// reachable.
    Namespace,
    /// Nothing: the process sees the host as its user does.
    None,
}

/// Confine such a backend: with [`Confinement::Namespace`], new namespaces
/// and an empty jail; in every mode, only `keep` (and stdio) stay open and
/// every capability goes.
pub fn confine(mode: Confinement, keep: &[std::os::fd::RawFd]) -> Result<(), SandboxError> {
    if mode == Confinement::Namespace {
        enter_namespaces()?;
    }
    // Nothing inherited by accident is reachable from guest-facing code.
    close_other_fds(keep)?;
    if mode == Confinement::Namespace {
        pivot_into_empty_jail()?;
    } else {
        // The host's network namespace: the message shim needs a socket
        // nobody else can connect to.
        crate::serve::prepare_private_shim().map_err(|source| SandboxError::Sys {
            what: "making the message shim's private socket",
            hint: "",
            source,
        })?;
    }
    drop_capabilities(&[])
}

/// chroot into `dir` (for hosts where namespaces are not available).
pub fn chroot_into(dir: &Path) -> Result<(), SandboxError> {
    let d = cpath(dir)?;
    // SAFETY: valid C string.
    sys("chroot", unsafe { libc::chroot(d.as_ptr()) })?;
    // SAFETY: valid C string.
    sys("chdir /", unsafe { libc::chdir(c"/".as_ptr()) })?;
    Ok(())
}

/// Linux capability numbers the backends may keep.
pub mod cap {
    pub const CHOWN: u32 = 0;
    pub const DAC_OVERRIDE: u32 = 1;
    pub const DAC_READ_SEARCH: u32 = 2;
    pub const FOWNER: u32 = 3;
    pub const FSETID: u32 = 4;
    pub const SETGID: u32 = 6;
    pub const SETUID: u32 = 7;
    pub const SETPCAP: u32 = 8;
    pub const MKNOD: u32 = 27;
    pub const SETFCAP: u32 = 31;
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Keep only `keep`: everything else leaves the bounding set (so no exec can
/// regain it) and the effective, permitted and inheritable sets. Ambient
/// capabilities are cleared.
pub fn drop_capabilities(keep: &[u32]) -> Result<(), SandboxError> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    for c in 0..=last {
        if !keep.contains(&c) {
            // Dropping from the bounding set needs CAP_SETPCAP, which goes
            // with the rest below. EINVAL: the kernel does not know this cap.
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) };
            if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                sys("dropping a capability from the bounding set", rc)?;
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    sys("clearing ambient capabilities", unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    })?;
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut have = [CapData::default(); 2];
    // SAFETY: capget writes two data words into `have`, which has room.
    sys("capget", unsafe {
        libc::syscall(libc::SYS_capget, &mut hdr, have.as_mut_ptr()) as libc::c_int
    })?;
    let mut data = [CapData::default(); 2];
    for &c in keep {
        let (i, bit) = ((c / 32) as usize, 1u32 << (c % 32));
        // Only what we hold can be kept: an unprivileged daemon keeps less.
        if i < 2 && have[i].permitted & bit != 0 {
            data[i].effective |= bit;
            data[i].permitted |= bit;
        }
    }
    // SAFETY: capset reads a v3 header and two data words, both valid here.
    sys("capset", unsafe {
        libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) as libc::c_int
    })?;
    Ok(())
}

/// The effective capability mask of this process, from /proc (for tests
/// and for the start-up log).
pub fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok()
}
