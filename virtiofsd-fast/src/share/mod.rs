//! The filesystem the guest sees: FUSE requests (decoded by fuse-backend-rs)
//! turned into syscalls on the shared directory, through our own inode store
//! ([`crate::store`]).
//!
//! Every host call is made relative to a descriptor the store holds, one
//! path component at a time, never following a symlink: the guest cannot
//! name anything outside the share even without the sandbox. Names are
//! checked here too (no `/`, no `..` except at the root, where it is the
//! root). Guest permission checks are the guest kernel's (virtio-fs mounts
//! use default_permissions); files, directories, nodes and symlinks are
//! created with the guest caller's uid and gid as filesystem IDs, so the
//! host kernel gives them the right owner.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::transport::FsCacheReqHandler;

use crate::args::{CacheMode, Config, InodeFileHandles};
use crate::ledger::Ledger;
use crate::store::{self, cvt, openat, statx, to_stat, Handles, Node, Store};

mod acl;
mod session;

type Inode = u64;
type Handle = u64;

/// A statx's ctime in nanoseconds since the epoch (0 before it).
fn ctime_ns(sx: &libc::statx) -> u64 {
    (sx.stx_ctime.tv_sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(sx.stx_ctime.tv_nsec))
}

/// `ShareFs::listing_fresh` for a pass, the time `now` and the window
/// (ns), with the directory's ctime now (None: the times alone).
fn pass_fresh(pass: store::Listed, now: u64, window: u64, ctime: Option<u64>) -> bool {
    // A pass stamped in the future means the clock was set back.
    if pass.at > now || now - pass.at >= window / 4 * 3 {
        return false;
    }
    // A kernel's coarse clock ticks every few ms; a filesystem that keeps
    // whole seconds (vfat: two) shows no nanoseconds.
    let tick = if pass.ctime % 1_000_000_000 == 0 {
        2_000_000_000
    } else {
        20_000_000
    };
    pass.ctime.saturating_add(tick) < pass.at && ctime.is_none_or(|c| c == pass.ctime)
}

/// CLOCK_REALTIME in nanoseconds, the clock of the host's timestamps.
fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// How the guest may cache what it is told.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Policy {
    /// Nothing: data goes straight through (DIRECT_IO).
    Never,
    /// Metadata only: file data uncached, listings cached.
    Metadata,
    /// Data kept while a file is open (the kernel's default).
    Auto,
    /// Data kept across opens; listings cached.
    Always,
}

/// An open file or directory.
struct OpenFile {
    inode: Inode,
    /// Set at OPEN; a directory's is opened at its first use (see
    /// `ShareFs::opendir`).
    file: std::sync::OnceLock<File>,
    /// Held across lseek + getdents on a directory.
    dir_pos: Mutex<()>,
    /// A directory's offset where its last read found the end (u64::MAX:
    /// not known). The guest reads on until a reply comes back empty; that
    /// read is answered from here, without a trip to the host filesystem.
    /// (Entries made after the read that found the end may or may not show
    /// in this pass, as POSIX allows; a rewind reads again.)
    dir_end: AtomicU64,
    /// This handle's READDIRPLUS pass from offset 0, while it goes on
    /// (None: none, or a plain READDIR read since): see `Node::listed`.
    plus: Mutex<Option<store::Listed>>,
    /// Its slot in the ledger (u32::MAX: not kept).
    slot: u32,
}

/// The buffer for a GETXATTR or LISTXATTR of `size` bytes: no more than
/// Linux ever returns (XATTR_SIZE_MAX and XATTR_LIST_MAX, 64 KiB each),
/// whatever size the guest names.
fn xattr_buf(size: u32) -> usize {
    (size as usize).min(65536)
}

/// At most this many released directories wait to be closed per thread.
const CLOSE_LATER_MAX: usize = 16;

thread_local! {
    /// This thread's released directory handles, not yet closed.
    static CLOSE_LATER: std::cell::RefCell<Vec<Arc<OpenFile>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Keep `f` until this thread closes it: while its ring is quiet
/// ([`close_one_released`]), before it sleeps ([`close_released`]), or
/// with the others once [`CLOSE_LATER_MAX`] wait. (Closing touches no
/// thread-local state, so the list is emptied in place, keeping its
/// allocation.)
fn close_later(f: Arc<OpenFile>) {
    CLOSE_LATER.with(|c| {
        let mut c = c.borrow_mut();
        c.push(f);
        if c.len() >= CLOSE_LATER_MAX {
            c.clear();
        }
    });
}

thread_local! {
    /// This thread's last request was a listing that returned entries.
    static LISTING_CONTINUES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread's last request was a READDIR or READDIRPLUS that
/// returned entries (so the guest will read the directory again); clears
/// the mark.
pub fn take_listing_continues() -> bool {
    LISTING_CONTINUES.with(|c| c.replace(false))
}

/// Close every directory handle this thread's requests released.
pub fn close_released() {
    CLOSE_LATER.with(|c| c.borrow_mut().clear());
}

/// Close one of them, if any wait.
pub fn close_one_released() {
    CLOSE_LATER.with(|c| drop(c.borrow_mut().pop()));
}

/// The shared directory as a FUSE filesystem.
pub struct ShareFs {
    root_path: CString,
    store: Store,
    /// /proc/self/fd, for reopening O_PATH descriptors with real flags.
    proc_self_fd: OwnedFd,
    handles: RwLock<HashMap<Handle, Arc<OpenFile>>>,
    next_handle: AtomicU64,
    policy: Policy,
    timeout: Duration,
    coherent: bool,
    xattr: bool,
    writeback_wanted: bool,
    /// `--announce-submounts`, and whether the guest took it.
    submounts_wanted: bool,
    submounts: AtomicBool,
    writeback: AtomicBool,
    no_opendir_wanted: bool,
    no_opendir: AtomicBool,
    /// OPENDIR leaves the host open to the first request that needs it
    /// (the daemon may read any directory: DAC_READ_SEARCH).
    lazy_dirs: bool,
    /// `--posix-acl`, and whether the guest took it (FUSE_POSIX_ACL with
    /// FUSE_DONT_MASK: the guest sends modes unmasked and its umask apart).
    acl_wanted: bool,
    acl: AtomicBool,
    /// FUSE_SETXATTR_EXT: SETXATTR carries the guest's ACL flags (the
    /// backend negotiates it, fuse-backend-rs has no flag for it).
    setxattr_ext: AtomicBool,
    /// With `--state-file`: the guest's session, kept for a daemon started
    /// after this one dies.
    ledger: Option<Arc<Ledger>>,
    /// One open-file restore at a time.
    restoring: Mutex<()>,
}

/// Whether this process can open any directory for reading, whatever its
/// mode says (CAP_DAC_READ_SEARCH or CAP_DAC_OVERRIDE, as root has).
fn may_read_any_directory() -> bool {
    use backend_common::sandbox::cap;
    let mask = (1u64 << cap::DAC_OVERRIDE) | (1u64 << cap::DAC_READ_SEARCH);
    backend_common::sandbox::effective_capabilities().is_some_and(|c| c & mask != 0)
}

/// Descriptors the store may keep before it swaps the least recently used
/// for file handles: half the open-file limit (the rest is for open files,
/// sockets and memory regions), at most a million.
fn fd_budget() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `lim`, a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 512;
    }
    (lim.rlim_cur / 2).min(1_000_000) as usize
}

impl OpenFile {
    fn new(inode: Inode, file: Option<File>, slot: u32) -> Self {
        let cell = std::sync::OnceLock::new();
        if let Some(f) = file {
            let _ = cell.set(f);
        }
        OpenFile {
            inode,
            file: cell,
            dir_pos: Mutex::new(()),
            dir_end: AtomicU64::new(u64::MAX),
            plus: Mutex::new(None),
            slot,
        }
    }

    /// The host descriptor (`ShareFs::handle` has opened it).
    fn file(&self) -> io::Result<&File> {
        self.file.get().ok_or_else(|| err(libc::EBADF))
    }
}

impl ShareFs {
    /// RELEASE and RELEASEDIR: forget the handle; with `later`, its
    /// descriptor is closed once the reply is on its way.
    fn release_handle(&self, inode: Inode, handle: Handle, later: bool) -> io::Result<()> {
        // One the previous daemon left: claimed here so its slot goes.
        let _ = self.lookup_handle(inode, handle);
        let gone = {
            let mut handles = self.handles.write().unwrap();
            match handles.get(&handle) {
                Some(f) if f.inode == inode => {
                    if let (Some(l), true) = (&self.ledger, f.slot != u32::MAX) {
                        l.drop_handle(f.slot);
                    }
                    handles.remove(&handle)
                }
                _ => return Err(err(libc::EBADF)),
            }
        };
        // The descriptor is closed outside the handle table's lock. A
        // directory's is closed after the reply has gone (close of a
        // directory that was read frees the host's listing state, which
        // the guest need not wait for); a file's at once, since closing it
        // releases its locks and may flush.
        if let Some(f) = gone {
            if later {
                close_later(f);
            }
        }
        Ok(())
    }

    /// Open /proc/self/fd, which the filesystem keeps: this must happen
    /// before the sandbox hides /proc. The share itself is opened by
    /// `import`, from inside the sandbox. `root` is the share as this
    /// process will see it once sandboxed.
    pub fn new(cfg: &Config, root: &str) -> io::Result<Self> {
        let (policy, timeout) = match cfg.cache {
            CacheMode::Never => (Policy::Never, Duration::ZERO),
            CacheMode::Metadata => (Policy::Metadata, cfg.coherence),
            CacheMode::Auto => (Policy::Auto, cfg.coherence),
            // virtiofsd's `always`: a day, so host changes may never show.
            CacheMode::Always => (Policy::Always, Duration::from_secs(86400)),
            // Keep data across opens; AUTO_INVAL_DATA (see `init`) drops it
            // as soon as a refreshed attribute shows a new mtime or size, and
            // attributes are refreshed at least every coherence window.
            CacheMode::Coherent => (Policy::Always, cfg.coherence),
        };
        let handles = match cfg.inode_file_handles {
            InodeFileHandles::Never => Handles::Never,
            InodeFileHandles::Prefer => Handles::Prefer,
            InodeFileHandles::Mandatory => Handles::Mandatory,
        };
        let proc_self_fd = openat(
            libc::AT_FDCWD,
            c"/proc/self/fd",
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        // Modes come from the guest, already masked by its umask.
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(0) };
        Ok(ShareFs {
            root_path: CString::new(root).map_err(|_| err(libc::EINVAL))?,
            store: Store::new(handles, fd_budget()),
            proc_self_fd,
            handles: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            policy,
            timeout,
            coherent: cfg.cache == CacheMode::Coherent,
            xattr: cfg.xattr,
            writeback_wanted: cfg.writeback,
            submounts_wanted: cfg.announce_submounts,
            submounts: AtomicBool::new(false),
            writeback: AtomicBool::new(false),
            no_opendir_wanted: cfg.cache == CacheMode::Always,
            no_opendir: AtomicBool::new(false),
            lazy_dirs: may_read_any_directory(),
            acl_wanted: cfg.posix_acl,
            acl: AtomicBool::new(false),
            setxattr_ext: AtomicBool::new(false),
            ledger: None,
            restoring: Mutex::new(()),
        })
    }

    /// Open the share's root (again at each guest INIT) and forget all
    /// nodes and open files.
    pub fn import(&self) -> io::Result<()> {
        let root = openat(
            libc::AT_FDCWD,
            &self.root_path,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        self.handles.write().unwrap().clear();
        self.store.reset(root)
    }

    /// How many nodes the guest holds and how many descriptors they keep.
    pub fn counts(&self) -> (usize, usize) {
        (self.store.nodes(), self.store.open_fds())
    }

    /// FUSE_COPY_FILE_RANGE (fuse-backend-rs's server does not dispatch
    /// it; the backend calls this). The copy stays on the host, so a guest
    /// `cp` of a large file moves no data through guest memory, and a
    /// filesystem that can share extents (btrfs, XFS) shares them.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range(
        &self,
        inode_in: Inode,
        handle_in: Handle,
        offset_in: u64,
        inode_out: Inode,
        handle_out: Handle,
        offset_out: u64,
        len: u64,
        flags: u64,
    ) -> io::Result<usize> {
        if flags != 0 {
            return Err(err(libc::EINVAL));
        }
        let src = self.handle(inode_in, handle_in)?;
        let dst = self.handle(inode_out, handle_out)?;
        let mut off_in = i64::try_from(offset_in).map_err(|_| err(libc::EINVAL))?;
        let mut off_out = i64::try_from(offset_out).map_err(|_| err(libc::EINVAL))?;
        // The reply carries the count in 32 bits; Linux asks for at most
        // this much at once anyway.
        let len = len.min(u64::from(u32::MAX) & !0xfff) as usize;
        // SAFETY: both descriptors are held by `src` and `dst`; the offsets
        // are valid i64s the call updates.
        let n = unsafe {
            libc::copy_file_range(
                src.file()?.as_raw_fd(),
                &mut off_in,
                dst.file()?.as_raw_fd(),
                &mut off_out,
                len,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// FUSE_SYNCFS: the guest ran sync(2) or syncfs(2) on the mount whose
    /// root is `inode`; make the host filesystem under it durable.
    pub fn syncfs(&self, inode: Inode) -> io::Result<()> {
        // syncfs() refuses O_PATH descriptors: open the directory itself.
        let dir = open_dir(&*self.dir_fd(inode)?)?;
        // SAFETY: a descriptor we hold.
        cvt(unsafe { libc::syncfs(dir.as_raw_fd()) }).map(drop)
    }

    fn node(&self, inode: Inode) -> io::Result<Arc<Node>> {
        self.store.get(inode)
    }

    fn node_fd(&self, inode: Inode) -> io::Result<(Arc<Node>, Arc<OwnedFd>)> {
        let node = self.node(inode)?;
        let fd = self.store.fd(&node)?;
        Ok((node, fd))
    }

    /// A directory opened for reading (OPENDIR, or a listing without one).
    fn open_dir_node(&self, inode: Inode) -> io::Result<File> {
        let node = self.node(inode)?;
        if !node.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        self.store
            .open_node(&node, libc::O_RDONLY | libc::O_DIRECTORY)
            .map(File::from)
    }

    fn dir_fd(&self, inode: Inode) -> io::Result<Arc<OwnedFd>> {
        let (node, fd) = self.node_fd(inode)?;
        if !node.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        Ok(fd)
    }

    fn entry(&self, found: store::Found) -> Entry {
        // A directory another filesystem is mounted on (the share's own
        // root aside): with --announce-submounts the guest mounts it apart.
        let submount = self.submounts.load(Ordering::Relaxed)
            && found.node.id != ROOT_ID
            && found.st.stx_mode as u32 & libc::S_IFMT == libc::S_IFDIR
            && found.st.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT != 0
            && found.st.stx_attributes & STATX_ATTR_MOUNT_ROOT != 0;
        Entry {
            inode: found.node.id,
            generation: 0,
            attr: to_stat(&found.st),
            attr_flags: if submount { ATTR_SUBMOUNT } else { 0 },
            attr_timeout: self.timeout,
            entry_timeout: self.timeout,
        }
    }

    fn do_lookup(&self, parent: Inode, name: &CStr) -> io::Result<Entry> {
        let dir = self.dir_fd(parent)?;
        Ok(self.entry(self.store.lookup(parent, dir.as_raw_fd(), name)?))
    }

    /// Reopen an O_PATH descriptor with real open flags (through
    /// /proc/self/fd, which follows the descriptor, not a path).
    fn reopen(&self, fd: &OwnedFd, flags: libc::c_int) -> io::Result<File> {
        let name = proc_name(fd);
        let f = openat(
            self.proc_self_fd.as_raw_fd(),
            &name,
            flags & !libc::O_NOFOLLOW,
            0,
        )?;
        Ok(File::from(f))
    }

    /// Open flags as the host should see them.
    fn host_flags(&self, flags: u32) -> libc::c_int {
        let mut f = flags as libc::c_int & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY);
        if self.writeback.load(Ordering::Relaxed) {
            // With writeback caching the guest reads pages of files opened
            // write-only, and does appends itself.
            if f & libc::O_ACCMODE == libc::O_WRONLY {
                f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
            }
            f &= !libc::O_APPEND;
        }
        f
    }

    fn open_options(&self, dir: bool) -> OpenOptions {
        match self.policy {
            Policy::Never if !dir => OpenOptions::DIRECT_IO,
            Policy::Never => OpenOptions::empty(),
            Policy::Metadata if !dir => OpenOptions::DIRECT_IO,
            Policy::Metadata => OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE,
            Policy::Auto => OpenOptions::empty(),
            // The guest keeps the listing it reads, but drops it at the next
            // OPENDIR unless that answer adds KEEP_CACHE (see `opendir`).
            Policy::Always if dir && self.coherent => OpenOptions::CACHE_DIR,
            Policy::Always if dir => OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE,
            Policy::Always => OpenOptions::KEEP_CACHE,
        }
    }

    /// Run `f` with the guest caller's uid and gid as this thread's
    /// filesystem IDs, so what it creates is theirs.
    fn as_caller<T>(&self, ctx: &Context, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let _guard = FsIds::set(ctx.uid, ctx.gid)?;
        f()
    }

    /// Read a directory from `offset`, one entry at a time into `add`,
    /// which returns 0 when the reply is full.
    fn read_dir(
        &self,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        plus: bool,
        add: &mut dyn FnMut(&File, &CStr, DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        if size == 0 {
            return Ok(());
        }
        let open = if handle == 0 && self.no_opendir.load(Ordering::Relaxed) {
            None
        } else {
            Some(self.handle(inode, handle)?)
        };
        let temp;
        let dir_file: &File = match &open {
            Some(o) => o.file()?,
            None => {
                // The guest skipped OPENDIR (cache=always): open for this read.
                temp = self.open_dir_node(inode)?;
                &temp
            }
        };
        if let (true, Some(o)) = (self.coherent, &open) {
            if offset == 0 || !plus {
                // Time, then ctime, both before the host is read: a change
                // made from then on leaves the directory a later ctime.
                *o.plus.lock().unwrap() = match plus {
                    true => {
                        let at = realtime_ns();
                        statx(dir_file.as_raw_fd(), c"")
                            .ok()
                            .map(|sx| store::Listed {
                                at,
                                ctime: ctime_ns(&sx),
                            })
                    }
                    false => None,
                };
            }
        }
        // The open directory also names its entries for the lookups of
        // READDIRPLUS: no O_PATH descriptor is needed for a listing.
        let mut added = false;
        let mut add = |f: &File, name: &CStr, e: DirEntry| {
            let n = add(f, name, e)?;
            added |= n > 0;
            Ok(n)
        };
        let r = DIRENT_BUF.with_borrow_mut(|buf| {
            buf.resize((size as usize).clamp(1024, 64 * 1024), 0);
            self.parse_dirents(open.as_deref(), dir_file, buf, offset, &mut add)
        });
        LISTING_CONTINUES.with(|c| c.set(added));
        if let (true, Some(o), Ok(()), false) = (self.coherent, &open, &r, added) {
            // An empty reply ends the pass: if it was READDIRPLUS from the
            // start, every entry of the directory is fresh in the guest.
            if let Some(pass) = o.plus.lock().unwrap().take() {
                if let Ok(node) = self.node(inode) {
                    *node.listed.lock().unwrap() = Some(pass);
                }
            }
        }
        r
    }

    /// Whether the guest may keep its cached listing of directory `node`
    /// (coherent mode). Only a performance choice: a cached listing is
    /// served without READDIRPLUS, so its entries' dentries and attributes
    /// are not refreshed; it pays off only while those from the last full
    /// READDIRPLUS pass are still inside the window (else the guest would
    /// LOOKUP every entry, where a new pass costs a few requests). The
    /// listing itself must also be current: the host directory's ctime,
    /// which moves with every entry made, removed or renamed in it, must be
    /// the one it had when that pass began, and older than the pass by
    /// more than a tick of the clock that stamps it (a change within the
    /// same tick would leave it as it was). The guest checks the
    /// directory's mtime too, at each window (AUTO_INVAL_DATA).
    fn listing_fresh(&self, node: &Node) -> bool {
        let Some(pass) = *node.listed.lock().unwrap() else {
            return false;
        };
        let window = self.timeout.as_nanos().min(u128::from(u64::MAX)) as u64;
        let now = realtime_ns();
        // The stat only once the times allow it.
        pass_fresh(pass, now, window, None)
            && matches!(self.store.stat(node), Ok(sx)
                if pass_fresh(pass, now, window, Some(ctime_ns(&sx))))
    }

    fn parse_dirents(
        &self,
        open: Option<&OpenFile>,
        dir_file: &File,
        buf: &mut [u8],
        offset: u64,
        add: &mut dyn FnMut(&File, &CStr, DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        if let Some(o) = open {
            if offset != 0 && o.dir_end.load(Ordering::Relaxed) == offset {
                return Ok(());
            }
        }
        let n = {
            let _pos = open.as_ref().map(|o| o.dir_pos.lock().unwrap());
            // SAFETY: lseek on a descriptor we own; result checked.
            let r = unsafe { libc::lseek64(dir_file.as_raw_fd(), offset as i64, libc::SEEK_SET) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: the kernel writes at most buf.len() bytes into buf.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    dir_file.as_raw_fd(),
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            n as usize
        };
        let mut at = 0;
        // The end is found when getdents left room for the longest entry
        // and every entry it gave went into the reply.
        let mut end = (n + DIRENT_MAX <= buf.len()).then_some(offset);
        // struct linux_dirent64: ino u64, off i64, reclen u16, type u8, name.
        while at + 19 <= n {
            let ino = u64::from_ne_bytes(buf[at..at + 8].try_into().unwrap());
            let off = u64::from_ne_bytes(buf[at + 8..at + 16].try_into().unwrap());
            let reclen = u16::from_ne_bytes(buf[at + 16..at + 18].try_into().unwrap()) as usize;
            let type_ = u32::from(buf[at + 18]);
            if reclen == 0 || at + reclen > n {
                break;
            }
            // The kernel NUL-terminates (and pads) each name.
            let Ok(cname) = CStr::from_bytes_until_nul(&buf[at + 19..at + reclen]) else {
                break;
            };
            at += reclen;
            let name = cname.to_bytes();
            if name == b"." || name == b".." {
                end = end.map(|_| off);
                continue;
            }
            let e = DirEntry {
                ino,
                offset: off,
                type_,
                name,
            };
            if add(dir_file, cname, e)? == 0 {
                end = None;
                break;
            }
            end = end.map(|_| off);
        }
        if at < n {
            end = None;
        }
        if let Some(o) = open {
            o.dir_end.store(end.unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        Ok(())
    }

    /// After making `name` in `parent`, take a node for it.
    fn made(&self, parent: Inode, parent_fd: &OwnedFd, name: &CStr) -> io::Result<Entry> {
        Ok(self.entry(self.store.lookup(parent, parent_fd.as_raw_fd(), name)?))
    }
}

/// This thread's filesystem uid and gid, set to the guest caller's for the
/// guard's life (setfsuid/setfsgid are per thread, and dropping fsuid 0
/// also drops the capabilities that would bypass permission checks).
struct FsIds {
    uid: bool,
    gid: bool,
}

impl FsIds {
    fn set(uid: u32, gid: u32) -> io::Result<FsIds> {
        let mut g = FsIds {
            uid: false,
            gid: false,
        };
        if gid != 0 {
            // SAFETY: setfsgid only changes this thread's credentials.
            unsafe { libc::syscall(libc::SYS_setfsgid, gid) };
            g.gid = true;
            // SAFETY: as above; an invalid ID reads the current one back.
            if unsafe { libc::syscall(libc::SYS_setfsgid, u32::MAX) } as u32 != gid {
                return Err(err(libc::EPERM));
            }
        }
        if uid != 0 {
            // SAFETY: setfsuid only changes this thread's credentials.
            unsafe { libc::syscall(libc::SYS_setfsuid, uid) };
            g.uid = true;
            // SAFETY: as above.
            if unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) } as u32 != uid {
                return Err(err(libc::EPERM));
            }
        }
        Ok(g)
    }
}

impl Drop for FsIds {
    fn drop(&mut self) {
        if self.uid {
            // SAFETY: back to root for this thread.
            unsafe { libc::syscall(libc::SYS_setfsuid, 0) };
        }
        if self.gid {
            // SAFETY: as above.
            unsafe { libc::syscall(libc::SYS_setfsgid, 0) };
        }
    }
}

/// A name the guest may use for a directory entry it creates or removes.
fn check_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(err(libc::EINVAL));
    }
    Ok(())
}

thread_local! {
    /// getdents64 output, kept per thread so a READDIR allocates nothing.
    static DIRENT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Open a directory node for reading: "." relative to its O_PATH
/// descriptor, a one-component walk that needs no /proc.
fn open_dir(fd: &OwnedFd) -> io::Result<File> {
    openat(
        fd.as_raw_fd(),
        c".",
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
    .map(File::from)
}

/// statx: the file is the root of a mount.
const STATX_ATTR_MOUNT_ROOT: u64 = 0x2000;
/// fuse_attr.flags: this directory is a submount.
const ATTR_SUBMOUNT: u32 = 1;

/// The longest linux_dirent64: header, a 255-byte name and its NUL,
/// rounded up to 8 bytes.
const DIRENT_MAX: usize = (19 + 256 + 7) & !7;

/// The name of `fd` in /proc/self/fd.
fn proc_name(fd: &impl AsRawFd) -> CString {
    CString::new(fd.as_raw_fd().to_string()).expect("digits have no NUL")
}

/// A File that borrows a descriptor for an I/O call.
fn borrowed(fd: RawFd) -> ManuallyDrop<File> {
    // SAFETY: the File is never dropped (ManuallyDrop), so the descriptor
    // stays owned by its real owner, who outlives the borrow.
    ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

fn timespec(sec: i64, nsec: i64, set: bool, now: bool) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: if now {
            libc::UTIME_NOW
        } else if set {
            nsec
        } else {
            libc::UTIME_OMIT
        },
    }
}

impl FileSystem for ShareFs {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.import()?;
        for flag in [&self.writeback, &self.submounts, &self.no_opendir] {
            flag.store(false, Ordering::Relaxed);
        }
        let mut opts = FsOptions::DO_READDIRPLUS;
        if self.submounts_wanted && capable.contains(FsOptions::SUBMOUNTS) {
            opts |= FsOptions::SUBMOUNTS;
            self.submounts.store(true, Ordering::Relaxed);
        }
        if self.writeback_wanted && capable.contains(FsOptions::WRITEBACK_CACHE) {
            opts |= FsOptions::WRITEBACK_CACHE;
            self.writeback.store(true, Ordering::Relaxed);
        }
        // Where listings may be cached for good, skip OPENDIR/RELEASEDIR
        // too: a warm walk then sends nothing.
        if self.no_opendir_wanted && capable.contains(FsOptions::ZERO_MESSAGE_OPENDIR) {
            opts |= FsOptions::ZERO_MESSAGE_OPENDIR;
            self.no_opendir.store(true, Ordering::Relaxed);
        }
        if self.coherent && capable.contains(FsOptions::AUTO_INVAL_DATA) {
            opts |= FsOptions::AUTO_INVAL_DATA;
        }
        // With ACLs the guest checks permissions against them and leaves the
        // umask to us: a default ACL on the parent replaces it (see
        // `create_mode`).
        let acl = self.acl_wanted && capable.contains(FsOptions::POSIX_ACL | FsOptions::DONT_MASK);
        if acl {
            opts |= FsOptions::POSIX_ACL | FsOptions::DONT_MASK;
        }
        self.acl.store(acl, Ordering::Relaxed);
        self.setxattr_ext.store(false, Ordering::Relaxed);
        // READDIRPLUS on every directory read (no READDIRPLUS_AUTO): each
        // reply refreshes a whole directory's dentries and attributes, so a
        // walk like `find` or `git status` revalidates per directory instead
        // of per entry. Reads in parallel and up to 1 MiB per request,
        // lookups and readdirs of one directory in parallel, O_TRUNC handled
        // in OPEN: without them a Linux guest serialises directory
        // operations and splits I/O into 128 KiB.
        opts |= capable
            & (FsOptions::ASYNC_READ
                | FsOptions::BIG_WRITES
                | FsOptions::MAX_PAGES
                | FsOptions::PARALLEL_DIROPS
                | FsOptions::ASYNC_DIO
                | FsOptions::ATOMIC_O_TRUNC);
        // A new mount: whatever session the ledger held is over.
        if let (Some(l), Some(root)) = (&self.ledger, self.store.root_key()) {
            l.begin(self.agreed(), root);
        }
        Ok(opts)
    }

    fn destroy(&self) {
        let (nodes, descriptors) = self.counts();
        tracing::info!(nodes, descriptors, "guest unmounted");
        self.handles.write().unwrap().clear();
        self.store.clear();
        if let Some(l) = &self.ledger {
            l.end();
        }
    }

    fn lookup(&self, _ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        let b = name.to_bytes();
        if b.is_empty() || b.contains(&b'/') || b == b"." {
            return Err(err(libc::EINVAL));
        }
        if b == b".." {
            // At the root it is the root. Below, it could leave the share if
            // the host moved the directory out, and Linux only sends it for
            // NFS export: refuse it.
            if parent != ROOT_ID {
                return Err(err(libc::EACCES));
            }
            return self.do_lookup(ROOT_ID, c".");
        }
        match self.do_lookup(parent, name) {
            // Let the guest cache the absence for the window: builds and
            // `git status` probe many names that do not exist.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !self.timeout.is_zero() => {
                Ok(Entry {
                    inode: 0,
                    generation: 0,
                    // SAFETY: stat64 is plain old data; all-zero is valid.
                    attr: unsafe { std::mem::zeroed() },
                    attr_flags: 0,
                    attr_timeout: self.timeout,
                    entry_timeout: self.timeout,
                })
            }
            r => r,
        }
    }

    fn forget(&self, _ctx: &Context, inode: Inode, count: u64) {
        self.store.forget(inode, count)
    }

    fn batch_forget(&self, _ctx: &Context, requests: Vec<(Inode, u64)>) {
        for (inode, count) in requests {
            self.store.forget(inode, count)
        }
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(stat64, Duration)> {
        let open = handle.and_then(|h| self.lookup_handle(inode, h).ok());
        let sx = match open.as_ref().and_then(|o| o.file.get()) {
            Some(f) => statx(f.as_raw_fd(), c"")?,
            None => self.store.stat(&*self.node(inode)?)?,
        };
        Ok((to_stat(&sx), self.timeout))
    }

    fn setattr(
        &self,
        _ctx: &Context,
        inode: Inode,
        attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let (node, fd) = self.node_fd(inode)?;
        let open = handle.and_then(|h| self.handle(inode, h).ok());
        let proc_name = proc_name(&fd);
        let pfd = self.proc_self_fd.as_raw_fd();
        if valid.contains(SetattrValid::MODE) {
            // SAFETY: plain syscalls on descriptors we hold; results checked.
            cvt(unsafe {
                match &open {
                    Some(o) => libc::fchmod(o.file()?.as_raw_fd(), attr.st_mode),
                    None => libc::fchmodat(pfd, proc_name.as_ptr(), attr.st_mode, 0),
                }
            })?;
        }
        if valid.intersects(SetattrValid::UID | SetattrValid::GID) {
            let uid = if valid.contains(SetattrValid::UID) {
                attr.st_uid
            } else {
                u32::MAX
            };
            let gid = if valid.contains(SetattrValid::GID) {
                attr.st_gid
            } else {
                u32::MAX
            };
            // SAFETY: as above; the empty path names the descriptor itself.
            cvt(unsafe {
                libc::fchownat(
                    fd.as_raw_fd(),
                    c"".as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if valid.contains(SetattrValid::SIZE) {
            let r = match &open {
                // SAFETY: as above.
                Some(o) => unsafe { libc::ftruncate(o.file()?.as_raw_fd(), attr.st_size) },
                None => {
                    if !node.is_reg() {
                        return Err(err(if node.is_dir() {
                            libc::EISDIR
                        } else {
                            libc::EINVAL
                        }));
                    }
                    let f = self.reopen(&fd, libc::O_WRONLY)?;
                    // SAFETY: as above.
                    unsafe { libc::ftruncate(f.as_raw_fd(), attr.st_size) }
                }
            };
            cvt(r)?;
        }
        let times = SetattrValid::ATIME
            | SetattrValid::MTIME
            | SetattrValid::ATIME_NOW
            | SetattrValid::MTIME_NOW;
        if valid.intersects(times) {
            let ts = [
                timespec(
                    attr.st_atime,
                    attr.st_atime_nsec,
                    valid.contains(SetattrValid::ATIME),
                    valid.contains(SetattrValid::ATIME_NOW),
                ),
                timespec(
                    attr.st_mtime,
                    attr.st_mtime_nsec,
                    valid.contains(SetattrValid::MTIME),
                    valid.contains(SetattrValid::MTIME_NOW),
                ),
            ];
            // SAFETY: as above; `ts` holds two timespecs.
            cvt(unsafe {
                match &open {
                    Some(o) => libc::futimens(o.file()?.as_raw_fd(), ts.as_ptr()),
                    None => libc::utimensat(pfd, proc_name.as_ptr(), ts.as_ptr(), 0),
                }
            })?;
        }
        Ok((to_stat(&statx(fd.as_raw_fd(), c"")?), self.timeout))
    }

    fn readlink(&self, _ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        let (_, fd) = self.node_fd(inode)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: the kernel writes at most buf.len() bytes into buf.
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        check_name(name)?;
        let dir = self.dir_fd(parent)?;
        self.as_caller(ctx, || {
            // SAFETY: valid C strings and a directory descriptor we hold.
            cvt(unsafe { libc::symlinkat(linkname.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
        })?;
        self.made(parent, &dir, name)
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
        let dir = self.dir_fd(parent)?;
        let mode = self.create_mode(&dir, mode, umask)?;
        self.as_caller(ctx, || {
            // SAFETY: as above.
            cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, u64::from(rdev)) })
        })?;
        self.made(parent, &dir, name)
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
        let dir = self.dir_fd(parent)?;
        let mode = self.create_mode(&dir, mode, umask)?;
        self.as_caller(ctx, || {
            // SAFETY: as above.
            cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })
        })?;
        self.made(parent, &dir, name)
    }

    fn unlink(&self, _ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        check_name(name)?;
        let dir = self.dir_fd(parent)?;
        // SAFETY: as above.
        cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
    }

    fn rmdir(&self, _ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        check_name(name)?;
        let dir = self.dir_fd(parent)?;
        // SAFETY: as above.
        cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) }).map(drop)
    }

    fn rename(
        &self,
        _ctx: &Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        check_name(oldname)?;
        check_name(newname)?;
        let old = self.dir_fd(olddir)?;
        let new = self.dir_fd(newdir)?;
        // SAFETY: as above.
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                old.as_raw_fd(),
                oldname.as_ptr(),
                new.as_raw_fd(),
                newname.as_ptr(),
                flags,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn link(
        &self,
        _ctx: &Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        check_name(newname)?;
        let (node, fd) = self.node_fd(inode)?;
        if node.is_dir() {
            return Err(err(libc::EPERM));
        }
        let dir = self.dir_fd(newparent)?;
        // SAFETY: as above; AT_EMPTY_PATH links the descriptor's own inode.
        cvt(unsafe {
            libc::linkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                dir.as_raw_fd(),
                newname.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        })?;
        self.made(newparent, &dir, newname)
    }

    fn open(
        &self,
        _ctx: &Context,
        inode: Inode,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        let (node, fd) = self.node_fd(inode)?;
        if !node.is_reg() && !node.is_dir() {
            // Devices, fifos and sockets are the guest's own business.
            return Err(err(libc::ENXIO));
        }
        let flags = self.host_flags(flags);
        let file = self.reopen(&fd, flags)?;
        let h = self.add_handle(inode, Some(file), flags);
        Ok((Some(h), self.open_options(node.is_dir()), None))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        check_name(name)?;
        let dir = self.dir_fd(parent)?;
        let flags = (self.host_flags(args.flags) & !libc::O_DIRECTORY)
            | libc::O_CREAT
            | libc::O_NOFOLLOW
            | (args.flags as libc::c_int & libc::O_EXCL);
        let mode = self.create_mode(&dir, args.mode, args.umask)?;
        // Create exclusively; a name that exists is opened only where it is
        // a regular file: O_CREAT on a device node or a FIFO would open it.
        let file = match self.as_caller(ctx, || {
            openat(dir.as_raw_fd(), name, flags | libc::O_EXCL, mode)
        }) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                let path_fd = openat(dir.as_raw_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                let kind = u32::from(statx(path_fd.as_raw_fd(), c"")?.stx_mode) & libc::S_IFMT;
                match kind {
                    libc::S_IFREG => {}
                    libc::S_IFDIR => return Err(err(libc::EISDIR)),
                    libc::S_IFLNK => return Err(err(libc::ELOOP)),
                    _ => return Err(err(libc::ENXIO)),
                }
                let reopen = flags & !(libc::O_CREAT | libc::O_EXCL);
                self.as_caller(ctx, || self.reopen(&path_fd, reopen).map(OwnedFd::from))?
            }
            r => r?,
        };
        // The node names the file just opened, not whatever the name
        // points at by now.
        let path_fd = {
            let name = proc_name(&file);
            openat(self.proc_self_fd.as_raw_fd(), &name, libc::O_PATH, 0)?
        };
        let sx = statx(path_fd.as_raw_fd(), c"")?;
        let found = self.store.adopt(path_fd, sx)?;
        let inode = found.node.id;
        let entry = self.entry(found);
        let h = self.add_handle(inode, Some(File::from(file)), flags);
        Ok((entry, Some(h), self.open_options(false), None))
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let open = self.handle(inode, handle)?;
        let mut f = borrowed(open.file()?.as_raw_fd());
        w.write_from(&mut *f, size as usize, offset)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<usize> {
        let open = self.handle(inode, handle)?;
        let mut f = borrowed(open.file()?.as_raw_fd());
        r.read_to(&mut *f, size as usize, offset)
    }

    fn flush(
        &self,
        _ctx: &Context,
        inode: Inode,
        handle: Handle,
        _lock_owner: u64,
    ) -> io::Result<()> {
        let open = self.handle(inode, handle)?;
        // Closing a duplicate reports delayed write errors (NFS-style) and
        // drops POSIX locks, as close() in the guest would.
        // SAFETY: dup of a descriptor we hold; the copy is closed at once.
        let dup = cvt(unsafe { libc::dup(open.file()?.as_raw_fd()) })?;
        // SAFETY: `dup` is ours alone.
        cvt(unsafe { libc::close(dup) }).map(drop)
    }

    fn fsync(
        &self,
        _ctx: &Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        let open = self.handle(inode, handle)?;
        let fd = open.file()?.as_raw_fd();
        // SAFETY: plain syscalls on a descriptor we hold.
        cvt(unsafe {
            if datasync {
                libc::fdatasync(fd)
            } else {
                libc::fsync(fd)
            }
        })
        .map(drop)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        self.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        _ctx: &Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        let open = self.handle(inode, handle)?;
        // SAFETY: as above.
        cvt(unsafe {
            libc::fallocate64(
                open.file()?.as_raw_fd(),
                mode as libc::c_int,
                offset as i64,
                length as i64,
            )
        })
        .map(drop)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        _ctx: &Context,
        inode: Inode,
        _flags: u32,
        handle: Handle,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.release_handle(inode, handle, false)
    }

    fn statfs(&self, _ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        let (_, fd) = self.node_fd(inode)?;
        // SAFETY: statvfs64 is plain old data; all-zero is a valid value.
        let mut out: statvfs64 = unsafe { std::mem::zeroed() };
        // SAFETY: `out` is a valid out buffer.
        cvt(unsafe { libc::fstatvfs64(fd.as_raw_fd(), &mut out) })?;
        Ok(out)
    }

    fn setxattr(
        &self,
        _ctx: &Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        let f = self.xattr_file(inode)?;
        self.set_xattr_on(&f, name, value, flags)
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let f = self.xattr_file(inode)?;
        let mut buf = vec![0u8; xattr_buf(size)];
        // SAFETY: the kernel writes at most `buf.len()` bytes into buf.
        let n = unsafe {
            libc::fgetxattr(
                f.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            return Ok(GetxattrReply::Count(n as u32));
        }
        buf.truncate(n as usize);
        Ok(GetxattrReply::Value(buf))
    }

    fn listxattr(&self, _ctx: &Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        let f = self.xattr_file(inode)?;
        let mut buf = vec![0u8; xattr_buf(size)];
        // SAFETY: the kernel writes at most `buf.len()` bytes into buf.
        let n = unsafe { libc::flistxattr(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            return Ok(ListxattrReply::Count(n as u32));
        }
        buf.truncate(n as usize);
        Ok(ListxattrReply::Names(buf))
    }

    fn removexattr(&self, _ctx: &Context, inode: Inode, name: &CStr) -> io::Result<()> {
        let f = self.xattr_file(inode)?;
        // SAFETY: valid name; result checked.
        cvt(unsafe { libc::fremovexattr(f.as_raw_fd(), name.as_ptr()) }).map(drop)
    }

    fn opendir(
        &self,
        _ctx: &Context,
        inode: Inode,
        _flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions)> {
        if self.no_opendir.load(Ordering::Relaxed) {
            // How a server takes up the kernel's zero-message OPENDIR: from
            // this answer on, the guest opens directories without asking,
            // with their listings cached (FOPEN_CACHE_DIR | KEEP_CACHE), and
            // reads them with file handle 0.
            return Err(err(libc::ENOSYS));
        }
        let node = self.node(inode)?;
        if !node.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        let file = if self.lazy_dirs {
            // Opened by the first request that needs it: a guest serving
            // the listing from its cache never does, and the one that
            // reads it pays for the open inside a listing that costs far
            // more. With DAC_READ_SEARCH the open can only fail if the
            // directory is gone, which a guest sees as a removal just
            // after its opendir.
            None
        } else {
            Some(self.open_dir_node(inode)?)
        };
        let mut options = self.open_options(true);
        if self.coherent && self.listing_fresh(&node) {
            options |= OpenOptions::KEEP_CACHE;
        }
        let h = self.add_handle(inode, file, libc::O_RDONLY | libc::O_DIRECTORY);
        Ok((Some(h), options))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.read_dir(inode, handle, size, offset, false, &mut |_, _, e| {
            add_entry(e)
        })
    }

    fn readdirplus(
        &self,
        _ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let mut first = true;
        self.read_dir(inode, handle, size, offset, true, &mut |dir, name, e| {
            let found = match self.store.lookup(inode, dir.as_raw_fd(), name) {
                Ok(f) => f,
                // Gone since getdents: leave it out.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(1),
                Err(err) if first => return Err(err),
                Err(_) => return Ok(0),
            };
            first = false;
            let id = found.node.id;
            let n = add_entry(e, self.entry(found))?;
            if n == 0 {
                // Did not fit: the guest never saw it, so it holds no reference.
                self.store.forget(id, 1);
            }
            Ok(n)
        })
    }

    fn releasedir(
        &self,
        _ctx: &Context,
        inode: Inode,
        _flags: u32,
        handle: Handle,
    ) -> io::Result<()> {
        self.release_handle(inode, handle, true)
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
        Err(err(libc::ENOSYS))
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        let (_, fd) = self.node_fd(inode)?;
        let name = proc_name(&*fd);
        let pfd = self.proc_self_fd.as_raw_fd();
        self.as_caller(ctx, || {
            // SAFETY: valid C string; AT_EACCESS checks with the filesystem
            // IDs just set.
            cvt(unsafe {
                libc::faccessat(pfd, name.as_ptr(), mask as libc::c_int, libc::AT_EACCESS)
            })
        })
        .map(drop)
    }

    fn lseek(
        &self,
        _ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let open = self.handle(inode, handle)?;
        // SAFETY: as above.
        let r = unsafe { libc::lseek64(open.file()?.as_raw_fd(), offset as i64, whence as i32) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    #[test]
    fn a_pass_is_fresh_only_inside_the_window_with_the_directory_as_it_was() {
        let c = 1000 * S + 123;
        let pass = store::Listed {
            at: 1001 * S,
            ctime: c,
        };
        assert!(pass_fresh(pass, 1001 * S + 100 * MS, S, Some(c)));
        assert!(
            !pass_fresh(pass, 1001 * S + 750 * MS, S, Some(c)),
            "3/4 of the window"
        );
        assert!(
            !pass_fresh(pass, 1001 * S - MS, S, Some(c)),
            "clock set back"
        );
        assert!(
            !pass_fresh(pass, 1001 * S + 100 * MS, 0, Some(c)),
            "no window"
        );
        assert!(
            !pass_fresh(pass, 1001 * S + MS, S, Some(c + 1)),
            "changed since"
        );
    }

    #[test]
    fn a_directory_changed_within_a_tick_of_the_pass_is_not_trusted() {
        // ns timestamps from a coarse clock: a few ms.
        let recent = store::Listed {
            at: 1000 * S,
            ctime: 1000 * S - 5 * MS,
        };
        assert!(!pass_fresh(recent, 1000 * S + MS, S, Some(recent.ctime)));
        // Whole seconds: a change later in the same second (or two, on
        // vfat) would keep this ctime.
        let whole = store::Listed {
            at: 1001 * S + 500 * MS,
            ctime: 1000 * S,
        };
        assert!(!pass_fresh(
            whole,
            1001 * S + 501 * MS,
            S,
            Some(whole.ctime)
        ));
        let old = store::Listed {
            at: 1003 * S,
            ctime: 1000 * S,
        };
        assert!(pass_fresh(old, 1003 * S + MS, S, Some(old.ctime)));
    }
}
