//! Extended attributes and POSIX ACLs (`--xattr`, `--posix-acl`): the
//! umask a DONT_MASK guest leaves to us, and FUSE_SETXATTR_EXT's
//! set-group-ID rule.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;

use super::{err, open_dir, Inode, ShareFs};
use crate::store::{cvt, statx};

impl ShareFs {
    /// Whether the guest took POSIX ACLs at its last INIT.
    pub fn acl_enabled(&self) -> bool {
        self.acl.load(Ordering::Relaxed)
    }

    /// The backend agreed FUSE_SETXATTR_EXT with the guest (or, at INIT,
    /// that it did not).
    pub fn set_setxattr_ext(&self, on: bool) {
        self.setxattr_ext.store(on, Ordering::Relaxed);
        if let Some(l) = &self.ledger {
            l.set_agreed(self.agreed());
        }
    }

    /// Whether SETXATTR requests carry the extended header.
    pub fn setxattr_ext(&self) -> bool {
        self.setxattr_ext.load(Ordering::Relaxed)
    }

    /// The mode to create a file with in `dir`. Without ACLs the guest has
    /// applied its umask already. With them (DONT_MASK) the umask is ours
    /// to apply, unless the directory has a default ACL: then the host
    /// kernel builds the new file's ACL from it and the mode, and the umask
    /// does not apply (this process's own umask is 0).
    pub(super) fn create_mode(&self, dir: &OwnedFd, mode: u32, umask: u32) -> io::Result<u32> {
        if !self.acl_enabled() || mode & umask == 0 {
            return Ok(mode & !umask);
        }
        let d = open_dir(dir)?;
        // SAFETY: a size query (no buffer) on a descriptor we hold.
        let n = unsafe {
            libc::fgetxattr(
                d.as_raw_fd(),
                c"system.posix_acl_default".as_ptr(),
                std::ptr::null_mut(),
                0,
            )
        };
        if n >= 0 {
            return Ok(mode);
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => Ok(mode & !umask),
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// SETXATTR with FUSE_SETXATTR_EXT's flags. With
    /// FUSE_SETXATTR_ACL_KILL_SGID the guest found that the caller setting
    /// an access ACL is neither in the file's group nor privileged, so the
    /// set-group-ID bit goes, as a local filesystem would drop it. (The
    /// host kernel keeps it: this process holds CAP_FSETID.)
    pub fn setxattr_flags(
        &self,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
        setxattr_flags: u32,
    ) -> io::Result<()> {
        const FUSE_SETXATTR_ACL_KILL_SGID: u32 = 1;
        let f = self.xattr_file(inode)?;
        self.set_xattr_on(&f, name, value, flags)?;
        if setxattr_flags & FUSE_SETXATTR_ACL_KILL_SGID != 0
            && name.to_bytes() == b"system.posix_acl_access"
        {
            let st = statx(f.as_raw_fd(), c"")?;
            let mode = u32::from(st.stx_mode);
            if mode & libc::S_ISGID != 0 {
                // SAFETY: a descriptor we hold; result checked.
                cvt(unsafe { libc::fchmod(f.as_raw_fd(), mode & 0o7777 & !libc::S_ISGID) })?;
            }
        }
        Ok(())
    }

    pub(super) fn set_xattr_on(
        &self,
        f: &File,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        // SAFETY: valid name and value buffers; result checked.
        cvt(unsafe {
            libc::fsetxattr(
                f.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags as libc::c_int,
            )
        })
        .map(drop)
    }

    /// A real descriptor for the xattr calls (which refuse O_PATH ones).
    pub(super) fn xattr_file(&self, inode: Inode) -> io::Result<File> {
        if !self.xattr {
            return Err(err(libc::ENOSYS));
        }
        let (node, fd) = self.node_fd(inode)?;
        if node.is_dir() {
            open_dir(&fd)
        } else if node.is_reg() {
            self.reopen(&fd, libc::O_RDONLY | libc::O_NONBLOCK)
        } else {
            Err(err(libc::ENOTSUP))
        }
    }
}
