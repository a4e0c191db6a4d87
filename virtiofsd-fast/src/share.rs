//! The filesystem the guest sees: fuse-backend-rs's passthrough filesystem
//! behind a guard that owns our policy decisions.
//!
//! The guard is where the share's boundary is enforced beyond what the
//! passthrough layer does (it answers LOOKUP of ".." for NFS export, which
//! would walk out of a directory that the host moved outside the share), and
//! where the cache mode turns into FUSE init flags.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::passthrough::{CachePolicy, Config as PtConfig, PassthroughFs};
use fuse_backend_rs::transport::FsCacheReqHandler;

use crate::args::{CacheMode, Config, InodeFileHandles, SandboxMode};

type Inode = u64;
type Handle = u64;

/// The shared directory as a FUSE filesystem.
pub struct ShareFs {
    inner: PassthroughFs<()>,
    coherent: bool,
    /// Inodes are named by file handle (see `create_as_root`).
    file_handles: bool,
}

/// What a cache mode means for guest-side timeouts and data caching.
/// `root` is the share as this process will see it once sandboxed.
pub fn passthrough_config(cfg: &Config, root: &str) -> PtConfig {
    let (policy, timeout) = match cfg.cache {
        CacheMode::Never => (CachePolicy::Never, Duration::ZERO),
        CacheMode::Metadata => (CachePolicy::Metadata, cfg.coherence),
        CacheMode::Auto => (CachePolicy::Auto, cfg.coherence),
        // virtiofsd's `always`: a day, so host changes may never show.
        CacheMode::Always => (CachePolicy::Always, Duration::from_secs(86400)),
        // Keep data across opens; AUTO_INVAL_DATA (see `init`) drops it as
        // soon as a refreshed attribute shows a new mtime or size, and the
        // attribute is refreshed at least every coherence window.
        CacheMode::Coherent => (CachePolicy::Always, cfg.coherence),
    };
    PtConfig {
        root_dir: root.to_string(),
        cache_policy: policy,
        entry_timeout: timeout,
        attr_timeout: timeout,
        xattr: cfg.xattr,
        writeback: cfg.writeback,
        // In a chroot, mountinfo names mounts by host paths that do not
        // resolve, so file handles could not be reopened there.
        inode_file_handles: cfg.inode_file_handles != InodeFileHandles::Never
            && cfg.sandbox != SandboxMode::Chroot,
        do_import: true,
        // Where listings may be cached for good, skip OPENDIR/RELEASEDIR
        // too (FUSE_NO_OPENDIR_SUPPORT): a warm walk then sends nothing.
        no_opendir: cfg.cache == CacheMode::Always,
        ..Default::default()
    }
}

impl ShareFs {
    /// Open the host handles the filesystem keeps (/proc/self/fd and
    /// mountinfo): this must happen before the sandbox hides /proc. The
    /// share itself is opened by `import`, from inside the sandbox.
    pub fn new(cfg: &Config, root: &str) -> io::Result<Self> {
        let inner = PassthroughFs::new(passthrough_config(cfg, root))?;
        Ok(ShareFs {
            inner,
            coherent: cfg.cache == CacheMode::Coherent,
            file_handles: cfg.inode_file_handles != InodeFileHandles::Never
                && cfg.sandbox != SandboxMode::Chroot,
        })
    }

    /// Open the share's root (again at each guest INIT).
    pub fn import(&self) -> io::Result<()> {
        self.inner.import()
    }
}

impl ShareFs {
    /// With inodes named by file handle, the passthrough layer's mkdir and
    /// symlink reopen the parent's handle after switching to the guest
    /// user's credentials, which clears the capability open_by_handle_at
    /// needs: they fail with EPERM for any non-root guest user.
    fn needs_root_create(&self, ctx: &Context) -> bool {
        self.file_handles && (ctx.uid != 0 || ctx.gid != 0)
    }

    /// Create as root, then give the new entry to the guest user: the owner
    /// the kernel would have set had the user created it (the group is the
    /// parent's when the parent is set-group-ID). Permission to create was
    /// already checked by the guest kernel (virtio-fs mounts use
    /// default_permissions). If the hand-over fails, the entry is removed.
    fn create_as_root(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        create: impl FnOnce(&Context) -> io::Result<Entry>,
    ) -> io::Result<Entry> {
        let root = Context {
            uid: 0,
            gid: 0,
            pid: ctx.pid,
        };
        let (pst, _) = self.inner.getattr(&root, parent, None)?;
        let mut entry = create(&root)?;
        // SAFETY: stat64 is plain old data; all-zero is a valid value.
        let mut attr: stat64 = unsafe { std::mem::zeroed() };
        attr.st_uid = ctx.uid;
        attr.st_gid = if pst.st_mode & libc::S_ISGID != 0 {
            pst.st_gid
        } else {
            ctx.gid
        };
        match self.inner.setattr(
            &root,
            entry.inode,
            attr,
            None,
            SetattrValid::UID | SetattrValid::GID,
        ) {
            Ok((st, _)) => {
                entry.attr = st;
                Ok(entry)
            }
            Err(e) => {
                let is_dir = entry.attr.st_mode & libc::S_IFMT == libc::S_IFDIR;
                let _ = if is_dir {
                    self.inner.rmdir(&root, parent, name)
                } else {
                    self.inner.unlink(&root, parent, name)
                };
                self.inner.forget(&root, entry.inode, 1);
                Err(e)
            }
        }
    }
}

/// A name the guest may use for a directory entry it creates or removes.
fn check_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

impl FileSystem for ShareFs {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut opts = self.inner.init(capable)?;
        if self.coherent && capable.contains(FsOptions::AUTO_INVAL_DATA) {
            opts |= FsOptions::AUTO_INVAL_DATA;
        }
        // READDIRPLUS on every directory read, not only on the ones the
        // kernel guesses will be stat'ed: each reply refreshes a whole
        // directory's dentries and attributes, so a walk like `find` or
        // `git status` revalidates per directory instead of per entry.
        opts.remove(FsOptions::READDIRPLUS_AUTO);
        // What the passthrough layer can do but does not ask for (the FUSE
        // server turns on only what both sides want): reads in parallel and
        // up to 1 MiB per request, lookups and readdirs of one directory in
        // parallel, O_TRUNC handled in OPEN. Without them a Linux guest
        // serialises directory operations and splits I/O into 128 KiB.
        opts |= capable
            & (FsOptions::ASYNC_READ
                | FsOptions::BIG_WRITES
                | FsOptions::MAX_PAGES
                | FsOptions::PARALLEL_DIROPS
                | FsOptions::ASYNC_DIO
                | FsOptions::ATOMIC_O_TRUNC);
        Ok(opts)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        let b = name.to_bytes();
        if b.is_empty() || b.contains(&b'/') {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // ".." at the root is the root (the passthrough layer maps it). Below
        // the root it could leave the share if the host moved the directory
        // out, and Linux only sends it for NFS export: refuse it.
        if b == b".." && parent != ROOT_ID {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        self.inner.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        check_name(name)?;
        if self.needs_root_create(ctx) {
            return self.create_as_root(ctx, parent, name, |root| {
                self.inner.symlink(root, linkname, parent, name)
            });
        }
        self.inner.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        check_name(name)?;
        self.inner.mknod(ctx, parent, name, mode, rdev, umask)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        check_name(name)?;
        if self.needs_root_create(ctx) {
            return self.create_as_root(ctx, parent, name, |root| {
                self.inner.mkdir(root, parent, name, mode, umask)
            });
        }
        self.inner.mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        check_name(name)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        check_name(name)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        check_name(oldname)?;
        check_name(newname)?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        check_name(newname)?;
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        self.inner.open(ctx, inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        check_name(name)?;
        self.inner.create(ctx, parent, name, args)
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: Inode, name: &CStr) -> io::Result<()> {
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions)> {
        let (h, mut opts) = self.inner.opendir(ctx, inode, flags)?;
        if self.coherent {
            // A cached listing is served without READDIRPLUS, so its entries
            // would each need a LOOKUP once their window is up: keep listings
            // uncached and let READDIRPLUS refresh them in bulk.
            opts.remove(OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE);
        }
        Ok((h, opts))
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    #[allow(clippy::too_many_arguments)]
    fn setupmapping(
        &self,
        _ctx: &Context,
        _inode: Inode,
        _handle: Handle,
        _foffset: u64,
        _len: u64,
        _flags: u64,
        _moffset: u64,
        _vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        // No DAX window: the guest falls back to regular reads.
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.inner
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }
}
