//! The inode store: which host file each guest node ID names, and how to
//! reach it again cheaply.
//!
//! A node is known by its host identity, (device, inode number). While the
//! guest holds a node, the store keeps an `O_PATH` descriptor for it: that
//! pins the host inode (so the identity cannot be reused under us) and makes
//! every later request one syscall on a descriptor, with no path walk and no
//! reopen. Descriptors are bounded: past `fd_limit` open ones, the least
//! recently used are swapped for a file handle (`name_to_handle_at`), taken
//! only then, and reopened by handle when next needed. Where the host cannot
//! make handles for a filesystem, its nodes keep their descriptors.
//!
//! LOOKUP of a name the guest already holds costs one `statx` by name: a node
//! with a descriptor pins its inode, so a matching (device, inode) is the same
//! file. Anything else takes the exact path: open the name `O_PATH` once and
//! take its type, identity and file handle from that one descriptor, so a
//! rename racing the lookup cannot pair one file's type with another's
//! handle. Whatever is reopened by handle later is checked against the
//! node's identity and type (a mismatch is ESTALE), and only regular files
//! and directories are ever opened for I/O.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::ledger::{Ledger, NodeRecord};

use fuse_backend_rs::abi::fuse_abi::stat64;
use fuse_backend_rs::api::filesystem::ROOT_ID;

/// Host identity of a file: (st_dev, st_ino).
pub type Key = (u64, u64);

/// Turn a libc return value into a result.
pub fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `openat(2)`, with close-on-exec.
pub fn openat(dir: RawFd, name: &CStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid C string; the result is checked.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `statx(2)` of `name` in `dir` (or of `dir` itself with an empty name),
/// never following a final symlink.
pub fn statx(dir: RawFd, name: &CStr) -> io::Result<libc::statx> {
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | libc::AT_STATX_SYNC_AS_STAT
        | if name.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    let mask = libc::STATX_BASIC_STATS | libc::STATX_BTIME;
    // SAFETY: `name` is a valid C string and `sx` a valid out buffer.
    cvt(unsafe { libc::statx(dir, name.as_ptr(), flags, mask, &mut sx) })?;
    Ok(sx)
}

/// When the file was made, where the filesystem records it: with the inode
/// number, an identity that survives the number being reused.
pub fn birth(sx: &libc::statx) -> Option<(i64, u32)> {
    (sx.stx_mask & libc::STATX_BTIME != 0).then_some((sx.stx_btime.tv_sec, sx.stx_btime.tv_nsec))
}

/// The identity `statx` reports.
pub fn key_of(sx: &libc::statx) -> Key {
    (
        libc::makedev(sx.stx_dev_major, sx.stx_dev_minor),
        sx.stx_ino,
    )
}

/// A `statx` result as the `stat64` FUSE replies carry.
pub fn to_stat(sx: &libc::statx) -> stat64 {
    // SAFETY: stat64 is plain old data; all-zero is a valid value.
    let mut st: stat64 = unsafe { std::mem::zeroed() };
    st.st_dev = libc::makedev(sx.stx_dev_major, sx.stx_dev_minor);
    st.st_ino = sx.stx_ino;
    st.st_mode = u32::from(sx.stx_mode);
    st.st_nlink = u64::from(sx.stx_nlink);
    st.st_uid = sx.stx_uid;
    st.st_gid = sx.stx_gid;
    st.st_rdev = libc::makedev(sx.stx_rdev_major, sx.stx_rdev_minor);
    st.st_size = sx.stx_size as i64;
    st.st_blksize = i64::from(sx.stx_blksize);
    st.st_blocks = sx.stx_blocks as i64;
    st.st_atime = sx.stx_atime.tv_sec;
    st.st_atime_nsec = i64::from(sx.stx_atime.tv_nsec);
    st.st_mtime = sx.stx_mtime.tv_sec;
    st.st_mtime_nsec = i64::from(sx.stx_mtime.tv_nsec);
    st.st_ctime = sx.stx_ctime.tv_sec;
    st.st_ctime_nsec = i64::from(sx.stx_ctime.tv_nsec);
    st
}

/// The kernel's MAX_HANDLE_SZ.
const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
#[derive(Clone)]
struct RawHandle {
    bytes: u32,
    kind: libc::c_int,
    data: [u8; MAX_HANDLE_SZ],
}

/// A host file handle: names an inode for as long as it exists, without
/// holding it open.
#[derive(Clone)]
pub struct FileHandle {
    kind: libc::c_int,
    data: Box<[u8]>,
}

impl PartialEq for FileHandle {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.data == other.data
    }
}

impl FileHandle {
    /// The handle of the file `fd` refers to.
    pub fn of(fd: RawFd) -> io::Result<Self> {
        Self::name_to_handle(fd, c"", libc::AT_EMPTY_PATH)
    }

    /// The handle of `name` in `dir`, not following a final symlink: no
    /// file is opened.
    pub fn at(dir: RawFd, name: &CStr) -> io::Result<Self> {
        Self::name_to_handle(dir, name, 0)
    }

    fn name_to_handle(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<Self> {
        let mut raw = RawHandle {
            bytes: MAX_HANDLE_SZ as u32,
            kind: 0,
            data: [0; MAX_HANDLE_SZ],
        };
        let mut mount_id: libc::c_int = 0;
        // SAFETY: `name` is a valid C string, `raw` has room for
        // MAX_HANDLE_SZ bytes as its header says, and `mount_id` is valid.
        let r = unsafe {
            libc::syscall(
                libc::SYS_name_to_handle_at,
                dir,
                name.as_ptr(),
                &mut raw as *mut RawHandle,
                &mut mount_id as *mut libc::c_int,
                flags,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (raw.bytes as usize).min(MAX_HANDLE_SZ);
        Ok(FileHandle {
            kind: raw.kind,
            data: raw.data[..n].into(),
        })
    }

    /// Open the file again, on the filesystem `mount_fd` is on.
    pub fn open(&self, mount_fd: RawFd, flags: libc::c_int) -> io::Result<OwnedFd> {
        let mut raw = RawHandle {
            bytes: self.data.len() as u32,
            kind: self.kind,
            data: [0; MAX_HANDLE_SZ],
        };
        raw.data[..self.data.len()].copy_from_slice(&self.data);
        // SAFETY: `raw` is a valid file_handle whose header matches its data.
        let r = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                mount_fd,
                &mut raw as *mut RawHandle,
                flags | libc::O_CLOEXEC,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor the kernel just returned; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
    }
}

/// How the store may name nodes when it closes their descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handles {
    /// Never: every node keeps its descriptor (no bound).
    Never,
    /// Where the filesystem allows: descriptors are bounded.
    Prefer,
    /// Always: a node whose handle cannot be made is refused.
    Mandatory,
}

/// One host file the guest knows.
pub struct Node {
    pub id: u64,
    pub key: Key,
    /// The file type bits of st_mode (they never change for an inode).
    pub kind: u32,
    /// Guest references (LOOKUPs not yet forgotten).
    refs: AtomicU64,
    fd: Mutex<Option<Arc<OwnedFd>>>,
    /// Taken when the descriptor is first given up (or at once, mandatory).
    handle: Mutex<HandleState>,
    /// Set on use; cleared by the eviction sweep (second chance).
    used: AtomicBool,
    /// Where a node without a descriptor was found (parent ID, name): its
    /// attributes can be read there by name, confirmed by identity,
    /// without opening it.
    name: Mutex<Option<(u64, Box<CStr>)>>,
    /// Its birth time, which a file found at that name must share (an
    /// inode number alone may have been reused). Kernels whose birth times
    /// come from the coarse clock leave one gap: a file made at the same
    /// name with the same number within the same tick passes, and its
    /// attributes are reported for the old node until the guest looks the
    /// name up again (a lookup compares file handles, which are exact).
    birth: Option<(i64, u32)>,
    /// Its slot in the ledger (NO_SLOT: not kept there).
    slot: u32,
    /// A directory's last READDIRPLUS pass that read it from the start to
    /// the end (None: none yet). Such a pass refreshed every entry's
    /// dentry and attributes in the guest.
    pub listed: Mutex<Option<Listed>>,
}

/// When a READDIRPLUS pass over a directory began.
#[derive(Clone, Copy, Debug)]
pub struct Listed {
    /// CLOCK_REALTIME, ns.
    pub at: u64,
    /// The directory's ctime then, ns since the epoch.
    pub ctime: u64,
}

/// A node the ledger does not keep.
const NO_SLOT: u32 = u32::MAX;

enum HandleState {
    NotYet,
    Some(FileHandle),
    /// The filesystem cannot make one: keep the descriptor.
    Unsupported,
}

impl Node {
    /// Whether `sx` describes this node's file: same device, inode and type.
    pub fn is(&self, sx: &libc::statx) -> bool {
        key_of(sx) == self.key && u32::from(sx.stx_mode) & libc::S_IFMT == self.kind
    }
    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.kind == libc::S_IFREG
    }
}

#[derive(Default)]
struct Maps {
    by_id: HashMap<u64, Arc<Node>>,
    by_key: HashMap<Key, u64>,
}

/// All nodes, and the bound on descriptors they hold.
pub struct Store {
    maps: RwLock<Maps>,
    next_id: AtomicU64,
    open_fds: AtomicUsize,
    fd_limit: usize,
    handles: Handles,
    /// One open directory per host filesystem, for `open_by_handle_at`.
    mounts: RwLock<HashMap<u64, Arc<OwnedFd>>>,
    sweeping: Mutex<()>,
    /// With `--state-file`: where nodes are kept for a daemon started
    /// after this one dies.
    ledger: Option<Arc<Ledger>>,
    /// One restore at a time, so a node left by the previous daemon is
    /// claimed once.
    restoring: Mutex<()>,
}

/// What a lookup found.
pub struct Found {
    pub node: Arc<Node>,
    pub st: libc::statx,
}

impl Store {
    pub fn new(handles: Handles, fd_limit: usize) -> Self {
        Store {
            maps: RwLock::new(Maps::default()),
            next_id: AtomicU64::new(ROOT_ID + 1),
            open_fds: AtomicUsize::new(0),
            fd_limit: if handles == Handles::Never {
                usize::MAX
            } else {
                fd_limit.max(64)
            },
            handles,
            mounts: RwLock::new(HashMap::new()),
            sweeping: Mutex::new(()),
            ledger: None,
            restoring: Mutex::new(()),
        }
    }

    /// Keep nodes in `ledger`, and resolve IDs handed out before this
    /// process from it; IDs go on from `next_id`.
    pub fn set_ledger(&mut self, ledger: Arc<Ledger>, next_id: u64) {
        self.ledger = Some(ledger);
        self.next_id
            .store(next_id.max(ROOT_ID + 1), Ordering::Relaxed);
    }

    /// The root's (device, inode).
    pub fn root_key(&self) -> Option<Key> {
        self.maps.read().unwrap().by_id.get(&ROOT_ID).map(|n| n.key)
    }

    /// A new ID, noted in the ledger before the guest can hear of it.
    fn new_id(&self) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Some(l) = &self.ledger {
            l.note_next_id(id + 1);
        }
        id
    }

    /// Keep a new node in the ledger; its slot (NO_SLOT: not kept).
    fn keep(&self, id: u64, key: Key, kind: u32, h: Option<&FileHandle>) -> u32 {
        let (Some(l), Some(h)) = (&self.ledger, h) else {
            return NO_SLOT;
        };
        l.add_node(&NodeRecord {
            id,
            refs: 1,
            dev: key.0,
            ino: key.1,
            kind,
            handle_type: h.kind,
            handle: h.data.to_vec(),
        })
        .unwrap_or(NO_SLOT)
    }

    /// Mirror `node`'s reference count into the ledger.
    fn note_refs(&self, node: &Node) {
        if let (Some(l), true) = (&self.ledger, node.slot != NO_SLOT) {
            l.set_refs(node.slot, node.refs.load(Ordering::Relaxed));
        }
    }

    /// Node `id` as the previous daemon left it, reopened by its handle.
    fn restore(&self, id: u64) -> io::Result<Arc<Node>> {
        let ebadf = || io::Error::from_raw_os_error(libc::EBADF);
        let ledger = self.ledger.as_ref().ok_or_else(ebadf)?;
        let _one = self.restoring.lock().unwrap();
        if let Some(n) = self.maps.read().unwrap().by_id.get(&id) {
            return Ok(n.clone());
        }
        let (slot, r) = ledger.take_left_node(id).ok_or_else(ebadf)?;
        let h = FileHandle {
            kind: r.handle_type,
            data: r.handle.into(),
        };
        let mount = self.mounts.read().unwrap().get(&r.dev).cloned();
        let found = mount
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))
            .and_then(|m| h.open(m.as_raw_fd(), libc::O_PATH))
            .and_then(|fd| Ok((statx(fd.as_raw_fd(), c"")?, fd)));
        let (sx, fd) = match found {
            Ok((sx, fd)) if key_of(&sx) == (r.dev, r.ino) => (sx, fd),
            other => {
                // Gone (or on a filesystem this daemon has not met): the
                // guest hears ESTALE, as for any file deleted under it.
                tracing::debug!(id, error = ?other.err(), "a node left by the previous daemon is gone");
                ledger.drop_node(slot);
                return Err(io::Error::from_raw_os_error(libc::ESTALE));
            }
        };
        let key = key_of(&sx);
        let node = Arc::new(Node {
            id,
            key,
            // The file's own type, not the ledger's word for it.
            kind: u32::from(sx.stx_mode) & libc::S_IFMT,
            refs: AtomicU64::new(r.refs),
            fd: Mutex::new(Some(Arc::new(fd))),
            handle: Mutex::new(HandleState::Some(h)),
            used: AtomicBool::new(true),
            name: Mutex::new(None),
            birth: birth(&sx),
            slot,
            listed: Mutex::new(None),
        });
        let mut maps = self.maps.write().unwrap();
        maps.by_id.insert(id, node.clone());
        maps.by_key.entry(key).or_insert(id);
        drop(maps);
        self.opened();
        Ok(node)
    }

    /// Forget everything and make `root` node ROOT_ID.
    pub fn reset(&self, root: OwnedFd) -> io::Result<()> {
        let sx = statx(root.as_raw_fd(), c"")?;
        let key = key_of(&sx);
        let node = Arc::new(Node {
            id: ROOT_ID,
            key,
            kind: u32::from(sx.stx_mode) & libc::S_IFMT,
            // The root is never forgotten.
            refs: AtomicU64::new(u64::MAX / 2),
            fd: Mutex::new(Some(Arc::new(root))),
            handle: Mutex::new(HandleState::Unsupported),
            used: AtomicBool::new(true),
            name: Mutex::new(None),
            birth: None,
            slot: NO_SLOT,
            listed: Mutex::new(None),
        });
        let mut maps = self.maps.write().unwrap();
        maps.by_id.clear();
        maps.by_key.clear();
        maps.by_id.insert(ROOT_ID, node);
        maps.by_key.insert(key, ROOT_ID);
        self.open_fds.store(1, Ordering::Relaxed);
        drop(maps);
        let mut mounts = self.mounts.write().unwrap();
        mounts.clear();
        let root = self.get(ROOT_ID)?;
        let fd = root
            .fd
            .lock()
            .unwrap()
            .clone()
            .expect("the root keeps its descriptor");
        if let Ok(m) = openat(fd.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0) {
            mounts.insert(key.0, Arc::new(m));
        }
        Ok(())
    }

    /// Drop every node (the guest unmounted).
    pub fn clear(&self) {
        let mut maps = self.maps.write().unwrap();
        maps.by_id.clear();
        maps.by_key.clear();
        self.open_fds.store(0, Ordering::Relaxed);
    }

    /// The node with this ID.
    pub fn get(&self, id: u64) -> io::Result<Arc<Node>> {
        if let Some(n) = self.maps.read().unwrap().by_id.get(&id) {
            return Ok(n.clone());
        }
        self.restore(id)
    }

    /// How many descriptors nodes hold now.
    pub fn open_fds(&self) -> usize {
        self.open_fds.load(Ordering::Relaxed)
    }

    /// How many nodes there are.
    pub fn nodes(&self) -> usize {
        self.maps.read().unwrap().by_id.len()
    }

    /// A descriptor for `node`: its own, or reopened by handle (and checked
    /// to be the node's file).
    pub fn fd(&self, node: &Node) -> io::Result<Arc<OwnedFd>> {
        node.used.store(true, Ordering::Relaxed);
        let mut slot = node.fd.lock().unwrap();
        if let Some(fd) = &*slot {
            return Ok(fd.clone());
        }
        let fd = Arc::new(
            self.open_by_handle(node, libc::O_PATH)?
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?,
        );
        *slot = Some(fd.clone());
        drop(slot);
        self.opened();
        Ok(fd)
    }

    /// A new open file description of `node` with `flags` (not O_PATH),
    /// kept by the caller: through the node's descriptor if it has one,
    /// else straight from its handle, one syscall, with nothing cached.
    /// Only regular files and directories are opened: opening a device
    /// node or a FIFO has effects of its own.
    pub fn open_node(&self, node: &Node, flags: libc::c_int) -> io::Result<OwnedFd> {
        if !node.is_reg() && !node.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        node.used.store(true, Ordering::Relaxed);
        if let Some(fd) = node.fd.lock().unwrap().clone() {
            return openat(fd.as_raw_fd(), c".", flags, 0);
        }
        match self.open_by_handle(node, flags)? {
            Some(fd) => Ok(fd),
            None => openat(self.fd(node)?.as_raw_fd(), c".", flags, 0),
        }
    }

    /// Open `node` from its file handle (None: it has none), and check that
    /// what opened is the node's file: its device, inode and type. A
    /// mismatch is ESTALE, as for a file deleted under the guest.
    fn open_by_handle(&self, node: &Node, flags: libc::c_int) -> io::Result<Option<OwnedFd>> {
        let handle = match &*node.handle.lock().unwrap() {
            HandleState::Some(h) => h.clone(),
            _ => return Ok(None),
        };
        let mount = self
            .mounts
            .read()
            .unwrap()
            .get(&node.key.0)
            .cloned()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        let fd = handle.open(mount.as_raw_fd(), flags)?;
        let sx = statx(fd.as_raw_fd(), c"")?;
        if !node.is(&sx) {
            tracing::warn!(
                node = node.id,
                "a file handle opened a file other than its node's: refused"
            );
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        }
        Ok(Some(fd))
    }

    /// The attributes of `node`: through its descriptor if it has one,
    /// else by name in its parent where the file there has its inode number
    /// and birth time, else through a descriptor reopened by handle.
    pub fn stat(&self, node: &Node) -> io::Result<libc::statx> {
        if let Some(fd) = node.fd.lock().unwrap().clone() {
            return statx(fd.as_raw_fd(), c"");
        }
        let at = node
            .name
            .lock()
            .unwrap()
            .as_ref()
            .map(|(p, n)| (*p, n.clone()));
        if let Some((parent, name)) = at {
            let pfd = self
                .maps
                .read()
                .unwrap()
                .by_id
                .get(&parent)
                .and_then(|p| p.fd.lock().unwrap().clone());
            if let Some(pfd) = pfd {
                match statx(pfd.as_raw_fd(), &name) {
                    Ok(sx)
                        if key_of(&sx) == node.key
                            && node.birth.is_some()
                            && birth(&sx) == node.birth =>
                    {
                        return Ok(sx)
                    }
                    // Renamed or gone: do not try that name again.
                    _ => *node.name.lock().unwrap() = None,
                }
            }
        }
        statx(self.fd(node)?.as_raw_fd(), c"")
    }

    /// Look `name` up in `dir` (a descriptor of a directory node) and take
    /// one guest reference on the node it names.
    ///
    /// A node already known costs one `statx` by name (plus a
    /// `name_to_handle_at` to confirm the identity of one that has given its
    /// descriptor back: a handle names one file exactly, so a match is that
    /// file). A new one is opened `O_PATH` once, and its attributes, type
    /// and handle all come from that descriptor: a rename between two
    /// resolutions of the name could otherwise give the node one file's
    /// type and another's handle. The descriptor is then closed (the node
    /// is named by its handle until a request needs one); without handles
    /// the node keeps it.
    pub fn lookup(&self, parent: u64, dir: RawFd, name: &CStr) -> io::Result<Found> {
        let sx = statx(dir, name)?;
        let key = key_of(&sx);
        {
            let maps = self.maps.read().unwrap();
            if let Some(node) = maps.by_key.get(&key).and_then(|id| maps.by_id.get(id)) {
                // A descriptor pins the inode: a matching key is this file.
                let same = node.fd.lock().unwrap().is_some() || {
                    // Only a handle: the inode number may have been reused.
                    match &*node.handle.lock().unwrap() {
                        HandleState::Some(h) => {
                            FileHandle::at(dir, name).is_ok_and(|ours| *h == ours)
                        }
                        _ => false,
                    }
                };
                if same && node.is(&sx) {
                    node.refs.fetch_add(1, Ordering::Relaxed);
                    node.used.store(true, Ordering::Relaxed);
                    self.note_refs(node);
                    return Ok(Found {
                        node: node.clone(),
                        st: sx,
                    });
                }
            }
        }
        let fd = openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let sx = statx(fd.as_raw_fd(), c"")?;
        let key = key_of(&sx);
        if self.handles != Handles::Never && self.mounts.read().unwrap().contains_key(&key.0) {
            match FileHandle::of(fd.as_raw_fd()) {
                Ok(h) => return Ok(self.insert_named(key, h, sx, (parent, name))),
                Err(e) if self.handles == Handles::Mandatory => return Err(e),
                // This filesystem makes none: keep a descriptor.
                Err(_) => {}
            }
        }
        self.adopt(fd, sx)
    }

    /// Take one reference on the node for `key` named by handle `h`, making
    /// it if there is none.
    fn insert_named(&self, key: Key, h: FileHandle, sx: libc::statx, at: (u64, &CStr)) -> Found {
        let mut maps = self.maps.write().unwrap();
        if let Some(node) = maps.by_key.get(&key).and_then(|id| maps.by_id.get(id)) {
            // Made by another request meanwhile?
            let same = node.fd.lock().unwrap().is_some()
                || matches!(&*node.handle.lock().unwrap(), HandleState::Some(o) if *o == h);
            if same && node.is(&sx) {
                node.refs.fetch_add(1, Ordering::Relaxed);
                self.note_refs(node);
                return Found {
                    node: node.clone(),
                    st: sx,
                };
            }
        }
        let id = self.new_id();
        let kind = u32::from(sx.stx_mode) & libc::S_IFMT;
        let slot = self.keep(id, key, kind, Some(&h));
        let node = Arc::new(Node {
            id,
            key,
            kind,
            refs: AtomicU64::new(1),
            fd: Mutex::new(None),
            handle: Mutex::new(HandleState::Some(h)),
            used: AtomicBool::new(true),
            name: Mutex::new(Some((at.0, at.1.into()))),
            birth: birth(&sx),
            slot,
            listed: Mutex::new(None),
        });
        maps.by_id.insert(id, node.clone());
        maps.by_key.insert(key, id);
        Found { node, st: sx }
    }

    /// Take one guest reference on the file `fd` (an O_PATH descriptor)
    /// refers to, making its node if it has none.
    pub fn adopt(&self, fd: OwnedFd, sx: libc::statx) -> io::Result<Found> {
        let key = key_of(&sx);
        let kind = u32::from(sx.stx_mode) & libc::S_IFMT;
        let mut handle = HandleState::NotYet;
        if self.handles == Handles::Mandatory {
            handle = HandleState::Some(FileHandle::of(fd.as_raw_fd())?);
        } else if self.ledger.is_some() && self.handles == Handles::Prefer {
            // The ledger names nodes by handle: take it now.
            if let Ok(h) = FileHandle::of(fd.as_raw_fd()) {
                handle = HandleState::Some(h);
            }
        }
        let mut fd = Some(fd);
        let mut maps = self.maps.write().unwrap();
        if let Some(node) = maps
            .by_key
            .get(&key)
            .and_then(|id| maps.by_id.get(id))
            .cloned()
        {
            let mut slot = node.fd.lock().unwrap();
            let same = if slot.is_some() {
                // Its descriptor pins the inode: the same file.
                true
            } else {
                // Only a handle: the inode number may have been reused since.
                let ours = fd.as_ref().map(|f| FileHandle::of(f.as_raw_fd()));
                match (&*node.handle.lock().unwrap(), ours) {
                    (HandleState::Some(h), Some(Ok(o))) => *h == o,
                    _ => false,
                }
            };
            if same {
                if slot.is_none() {
                    *slot = fd.take().map(Arc::new);
                    self.opened();
                }
                drop(slot);
                node.refs.fetch_add(1, Ordering::Relaxed);
                node.used.store(true, Ordering::Relaxed);
                self.note_refs(&node);
                return Ok(Found { node, st: sx });
            }
            // A new file with a recycled inode number: the old node lives
            // on under its ID until forgotten, but the key is the new one's.
        }
        let id = self.new_id();
        let slot = match &handle {
            HandleState::Some(h) => self.keep(id, key, kind, Some(h)),
            _ => NO_SLOT,
        };
        let node = Arc::new(Node {
            id,
            key,
            kind,
            refs: AtomicU64::new(1),
            fd: Mutex::new(fd.map(Arc::new)),
            handle: Mutex::new(handle),
            used: AtomicBool::new(true),
            name: Mutex::new(None),
            birth: None,
            slot,
            listed: Mutex::new(None),
        });
        maps.by_id.insert(id, node.clone());
        maps.by_key.insert(key, id);
        drop(maps);
        if node.is_dir() && !self.mounts.read().unwrap().contains_key(&key.0) {
            // The first directory seen on another filesystem (a submount):
            // from now on its files can be named by handle too.
            if let Some(fd) = node.fd.lock().unwrap().as_ref() {
                if let Ok(m) = openat(fd.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0) {
                    self.mounts
                        .write()
                        .unwrap()
                        .entry(key.0)
                        .or_insert(Arc::new(m));
                }
            }
        }
        self.opened();
        Ok(Found { node, st: sx })
    }

    /// Take `count` guest references off node `id`; at zero it goes.
    pub fn forget(&self, id: u64, count: u64) {
        if id == ROOT_ID {
            return;
        }
        // The read guard must be gone before `restore`, which takes the
        // write lock: held across it (as a match on the guard's borrow
        // would), the thread deadlocks on itself, and every request after
        // it waits behind the writer.
        let known = self.maps.read().unwrap().by_id.get(&id).cloned();
        let node = match known {
            Some(n) => n,
            // Maybe one the previous daemon left and the guest has not
            // used since.
            None => match self.restore(id) {
                Ok(n) => n,
                Err(_) => return,
            },
        };
        let mut cur = node.refs.load(Ordering::Relaxed);
        loop {
            let new = cur.saturating_sub(count);
            match node
                .refs
                .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        if cur > count {
            self.note_refs(&node);
            return;
        }
        // Lookups take references under the read lock, so under the write
        // lock a count of zero stays zero.
        let mut maps = self.maps.write().unwrap();
        if node.refs.load(Ordering::Acquire) != 0 {
            return;
        }
        maps.by_id.remove(&id);
        if maps.by_key.get(&node.key) == Some(&id) {
            maps.by_key.remove(&node.key);
        }
        drop(maps);
        if let (Some(l), true) = (&self.ledger, node.slot != NO_SLOT) {
            l.drop_node(node.slot);
        }
        if node.fd.lock().unwrap().take().is_some() {
            self.open_fds.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Count a descriptor taken; past the bound, give some back.
    fn opened(&self) {
        let n = self.open_fds.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.fd_limit {
            self.sweep();
        }
    }

    /// Close descriptors of nodes not used since the last sweep, keeping
    /// their handles, until an eighth of the bound is free.
    fn sweep(&self) {
        let Ok(_one) = self.sweeping.try_lock() else {
            return;
        };
        let target = self.fd_limit - self.fd_limit / 8;
        let nodes: Vec<Arc<Node>> = self.maps.read().unwrap().by_id.values().cloned().collect();
        for pass in 0..2 {
            for node in &nodes {
                if self.open_fds.load(Ordering::Relaxed) <= target {
                    return;
                }
                if node.id == ROOT_ID || (pass == 0 && node.used.swap(false, Ordering::Relaxed)) {
                    continue;
                }
                self.evict(node);
            }
        }
    }

    fn evict(&self, node: &Node) {
        let Ok(mut slot) = node.fd.try_lock() else {
            return;
        };
        let Some(fd) = slot.as_ref() else {
            return;
        };
        let mut handle = node.handle.lock().unwrap();
        if let HandleState::NotYet = *handle {
            *handle = match FileHandle::of(fd.as_raw_fd()) {
                Ok(h) => HandleState::Some(h),
                Err(e) => {
                    tracing::debug!(error = %e, "no file handle: keeping the descriptor");
                    HandleState::Unsupported
                }
            };
        }
        if !matches!(*handle, HandleState::Some(_)) {
            return;
        }
        let mut mounts = self.mounts.write().unwrap();
        if let std::collections::hash_map::Entry::Vacant(v) = mounts.entry(node.key.0) {
            // open_by_handle_at wants a real (not O_PATH) descriptor on the
            // filesystem: open a directory of it for reading.
            if !node.is_dir() {
                return;
            }
            match openat(fd.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0) {
                Ok(m) => v.insert(Arc::new(m)),
                Err(_) => return,
            };
        }
        drop(mounts);
        slot.take();
        self.open_fds.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn store_on(dir: &std::path::Path, handles: Handles, limit: usize) -> Store {
        let s = Store::new(handles, limit);
        let p = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        s.reset(openat(libc::AT_FDCWD, &p, libc::O_PATH | libc::O_DIRECTORY, 0).unwrap())
            .unwrap();
        s
    }

    fn root_fd(s: &Store) -> Arc<OwnedFd> {
        s.fd(&s.get(ROOT_ID).unwrap()).unwrap()
    }

    #[test]
    fn one_node_per_file_and_references_counted() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a"), b"x").unwrap();
        std::fs::hard_link(t.path().join("a"), t.path().join("b")).unwrap();
        let s = store_on(t.path(), Handles::Prefer, 1000);
        let r = root_fd(&s);
        let a = s.lookup(ROOT_ID, r.as_raw_fd(), c"a").unwrap();
        let b = s.lookup(ROOT_ID, r.as_raw_fd(), c"b").unwrap();
        assert_eq!(a.node.id, b.node.id, "hard links are one node");
        assert_eq!(s.nodes(), 2);
        s.forget(a.node.id, 1);
        assert_eq!(s.nodes(), 2, "one reference left");
        s.forget(a.node.id, 1);
        assert_eq!(s.nodes(), 1, "only the root is left");
        assert_eq!(s.open_fds(), 1);
        assert!(s.lookup(ROOT_ID, r.as_raw_fd(), c"missing").is_err());
    }

    #[test]
    fn descriptors_bounded_and_nodes_reopened_by_handle() {
        let t = tempfile::tempdir().unwrap();
        for i in 0..300 {
            std::fs::write(t.path().join(format!("f{i}")), format!("{i}")).unwrap();
        }
        let s = store_on(t.path(), Handles::Prefer, 100);
        let r = root_fd(&s);
        let mut nodes = Vec::new();
        for i in 0..300 {
            let name = CString::new(format!("f{i}")).unwrap();
            nodes.push(s.lookup(ROOT_ID, r.as_raw_fd(), &name).unwrap().node);
        }
        if FileHandle::of(r.as_raw_fd()).is_err() {
            // This filesystem makes no handles (tmpfs on old kernels does).
            backend_common::skip_or_fail(&format!("no file handles on {}", t.path().display()));
            return;
        }
        assert_eq!(s.open_fds(), 1, "new nodes are named by handle, not opened");
        for (i, n) in nodes.iter().enumerate() {
            let fd = s.fd(n).unwrap();
            let sx = statx(fd.as_raw_fd(), c"").unwrap();
            assert_eq!(sx.stx_size, format!("{i}").len() as u64);
            assert_eq!(key_of(&sx), n.key);
        }
        assert!(s.open_fds() <= 101, "{} open", s.open_fds());
        // A file replaced after its descriptor went is a new node.
        let n0 = &nodes[0];
        drop(s.fd(n0));
        std::fs::remove_file(t.path().join("f0")).unwrap();
        std::fs::write(t.path().join("f0"), b"new").unwrap();
        let again = s.lookup(ROOT_ID, r.as_raw_fd(), c"f0").unwrap();
        assert_eq!(again.st.stx_size, 3);
        assert_ne!(
            again.node.id, n0.id,
            "a new file, even on a reused inode number"
        );
        let fd = s.fd(&again.node).unwrap();
        assert_eq!(statx(fd.as_raw_fd(), c"").unwrap().stx_size, 3);
    }

    #[test]
    fn a_file_replaced_under_the_same_name_is_not_taken_for_the_old_one() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("g"), b"1").unwrap();
        let s = store_on(t.path(), Handles::Prefer, 1000);
        let r = root_fd(&s);
        let old = s.lookup(ROOT_ID, r.as_raw_fd(), c"g").unwrap().node;
        if FileHandle::of(r.as_raw_fd()).is_err() {
            backend_common::skip_or_fail(&format!("no file handles on {}", t.path().display()));
            return;
        }
        std::fs::remove_file(t.path().join("g")).unwrap();
        std::fs::write(t.path().join("g"), b"12345").unwrap();
        // Whether or not the inode number came back, the old node never
        // shows the new file (ext4 reuses numbers at once).
        match s.stat(&old) {
            Ok(sx) => assert_eq!(sx.stx_size, 1, "the new file's attributes for the old node"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}"),
        }
        let new = s.lookup(ROOT_ID, r.as_raw_fd(), c"g").unwrap();
        assert_ne!(new.node.id, old.id);
        assert_eq!(s.stat(&new.node).unwrap().stx_size, 5);
    }

    #[test]
    fn never_keeps_every_descriptor() {
        let t = tempfile::tempdir().unwrap();
        for i in 0..100 {
            std::fs::write(t.path().join(format!("f{i}")), b"").unwrap();
        }
        let s = store_on(t.path(), Handles::Never, 10);
        let r = root_fd(&s);
        for i in 0..100 {
            let name = CString::new(format!("f{i}")).unwrap();
            s.lookup(ROOT_ID, r.as_raw_fd(), &name).unwrap();
        }
        assert_eq!(s.open_fds(), 101);
    }
}
