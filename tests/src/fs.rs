//! FUSE over virtio-fs, as a guest kernel sends it.
//!
//! Queue 0 is the high-priority queue (FORGET, INTERRUPT); queue 1 and up are
//! request queues. Each request is a readable fuse_in_header plus arguments
//! and a writable fuse_out_header plus reply, as the virtio-fs spec lays out.

use std::time::Duration;

use crate::frontend::{BackendProcess, DeviceOptions, FrontendError, VuDevice};
use crate::queue::{Completion, ReqQueue, Shape};
use crate::ring::RingError;

/// FUSE opcodes (include/uapi/linux/fuse.h).
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SYNCFS: u32 = 50;
    pub const BATCH_FORGET: u32 = 42;
}

/// The root inode of every FUSE filesystem.
pub const ROOT_ID: u64 = 1;
/// sizeof(struct fuse_in_header).
pub const IN_HEADER_LEN: usize = 40;
/// sizeof(struct fuse_out_header).
pub const OUT_HEADER_LEN: usize = 16;
/// FUSE protocol version this client speaks.
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 38;

/// Errors of the FUSE client.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("the filesystem answered errno {0} ({msg})", msg = std::io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    #[error("malformed reply: {0}")]
    Malformed(String),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Frontend(#[from] FrontendError),
}

/// struct fuse_attr, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub mtime: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// fuse_attr.flags (FUSE_ATTR_SUBMOUNT = 1).
    pub flags: u32,
}

/// struct fuse_entry_out, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: u64,
    pub attr_valid: u64,
    pub attr: Attr,
}

/// One READDIRPLUS record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntryPlus {
    pub entry: Entry,
    pub ino: u64,
    pub off: u64,
    pub typ: u32,
    pub name: Vec<u8>,
}

/// What INIT negotiated.
#[derive(Clone, Copy, Debug)]
pub struct InitReply {
    pub major: u32,
    pub minor: u32,
    pub max_write: u32,
    pub flags: u64,
}

/// Encode a fuse_in_header.
pub fn in_header(len: u32, opcode: u32, unique: u64, nodeid: u64) -> [u8; IN_HEADER_LEN] {
    let mut h = [0u8; IN_HEADER_LEN];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&opcode.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h[16..24].copy_from_slice(&nodeid.to_le_bytes());
    // uid, gid, pid: root in the guest, pid 1.
    h[32..36].copy_from_slice(&1u32.to_le_bytes());
    h
}

/// Little-endian field reader over a reply.
struct Rd<'a>(&'a [u8], usize);

impl Rd<'_> {
    fn u32(&mut self) -> Result<u32, FsError> {
        let b = self
            .0
            .get(self.1..self.1 + 4)
            .ok_or_else(|| FsError::Malformed(format!("short at {}", self.1)))?;
        self.1 += 4;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FsError> {
        let lo = u64::from(self.u32()?);
        let hi = u64::from(self.u32()?);
        Ok(lo | (hi << 32))
    }
}

fn parse_attr(r: &mut Rd) -> Result<Attr, FsError> {
    let ino = r.u64()?;
    let size = r.u64()?;
    let blocks = r.u64()?;
    let _atime = r.u64()?;
    let mtime = r.u64()?;
    let _ctime = r.u64()?;
    let _nsecs = (r.u32()?, r.u32()?, r.u32()?);
    let mode = r.u32()?;
    let nlink = r.u32()?;
    let uid = r.u32()?;
    let gid = r.u32()?;
    let _rdev = r.u32()?;
    let _blksize = r.u32()?;
    let flags = r.u32()?;
    Ok(Attr {
        flags,
        ino,
        size,
        blocks,
        mtime,
        mode,
        nlink,
        uid,
        gid,
    })
}

fn parse_entry(r: &mut Rd) -> Result<Entry, FsError> {
    let nodeid = r.u64()?;
    let generation = r.u64()?;
    let entry_valid = r.u64()?;
    let attr_valid = r.u64()?;
    let _nsecs = (r.u32()?, r.u32()?);
    let attr = parse_attr(r)?;
    Ok(Entry {
        nodeid,
        generation,
        entry_valid,
        attr_valid,
        attr,
    })
}

/// Split a reply into its fuse_out_header fields and body.
pub fn parse_reply(c: &Completion, unique: u64) -> Result<&[u8], FsError> {
    let d = c.written();
    if d.len() < OUT_HEADER_LEN {
        return Err(FsError::Malformed(format!(
            "reply of {} bytes has no header",
            d.len()
        )));
    }
    let mut r = Rd(d, 0);
    let len = r.u32()? as usize;
    let error = r.u32()? as i32;
    let u = r.u64()?;
    if u != unique {
        return Err(FsError::Malformed(format!(
            "reply unique {u} for request {unique}"
        )));
    }
    if len != d.len() {
        return Err(FsError::Malformed(format!(
            "header says {len} bytes, used ring says {}, got {}",
            c.len,
            d.len()
        )));
    }
    if error != 0 {
        return Err(FsError::Errno(-error));
    }
    Ok(&d[OUT_HEADER_LEN..])
}

/// A FUSE session over a vhost-user-fs device.
pub struct FuseClient {
    pub dev: VuDevice,
    pub hiprio: ReqQueue,
    pub req: ReqQueue,
    unique: u64,
    pub shape: Shape,
    pub init: Option<InitReply>,
}

/// Reply buffer large enough for any single reply this client asks for.
pub const MAX_REPLY: u32 = 256 * 1024;

impl FuseClient {
    /// Bring up hiprio + one request queue on a backend process.
    pub fn connect(backend: &mut BackendProcess, depth: usize) -> Result<Self, FsError> {
        let opts = DeviceOptions {
            queues: 2,
            queue_size: 1024.min((depth * 4).next_power_of_two() as u16).max(64),
            ..Default::default()
        };
        let dev = backend.device(&opts)?;
        Self::on_device(dev, depth)
    }

    /// Wrap an already configured device (queues 0 and 1 set up).
    pub fn on_device(mut dev: VuDevice, depth: usize) -> Result<Self, FsError> {
        let mut rings = std::mem::take(&mut dev.queues).into_iter();
        let (Some(h), Some(q)) = (rings.next(), rings.next()) else {
            return Err(FsError::Malformed(
                "a virtio-fs device needs two queues".into(),
            ));
        };
        let hiprio = ReqQueue::new(h, &mut dev.mem, 4, 4096, 4096)?;
        let req = ReqQueue::new(q, &mut dev.mem, depth, 64 * 1024 + 4096, MAX_REPLY)?;
        Ok(FuseClient {
            dev,
            hiprio,
            req,
            unique: 0,
            shape: Shape::DIRECT,
            init: None,
        })
    }

    pub fn set_timeout(&mut self, t: Duration) {
        self.req.timeout = t;
        self.hiprio.timeout = t;
    }

    /// Next request id (never 0: the kernel reserves it for notifications).
    pub fn next_unique(&mut self) -> u64 {
        self.unique += 2;
        self.unique
    }

    /// Queue one request without waiting; returns (token, unique).
    pub fn push(
        &mut self,
        opcode: u32,
        nodeid: u64,
        args: &[&[u8]],
        reply_len: u32,
    ) -> Result<(u16, u64), FsError> {
        let unique = self.next_unique();
        let len = IN_HEADER_LEN + args.iter().map(|a| a.len()).sum::<usize>();
        let hdr = in_header(len as u32, opcode, unique, nodeid);
        let mut parts: Vec<&[u8]> = Vec::with_capacity(args.len() + 1);
        parts.push(&hdr);
        parts.extend_from_slice(args);
        let token = self
            .req
            .push(&parts, &[OUT_HEADER_LEN as u32 + reply_len], self.shape)?;
        Ok((token, unique))
    }

    /// Send one request and return the reply body (after fuse_out_header).
    pub fn call(
        &mut self,
        opcode: u32,
        nodeid: u64,
        args: &[&[u8]],
        reply_len: u32,
    ) -> Result<Vec<u8>, FsError> {
        let (token, unique) = self.push(opcode, nodeid, args, reply_len)?;
        self.req.publish()?;
        let c = self.req.wait_with(crate::queue::Copy::Written)?;
        if c.token != token {
            return Err(FsError::Malformed(format!(
                "completion for {} while {} was the only one in flight",
                c.token, token
            )));
        }
        parse_reply(&c, unique).map(|b| b.to_vec())
    }

    /// FUSE_INIT, asking for what a Linux 6.x guest asks for.
    pub fn init(&mut self) -> Result<InitReply, FsError> {
        self.init_with(0)
    }

    /// FUSE_INIT offering `extra` flags (fuse_init_in's flags, flags2 in
    /// the high half) besides the usual ones.
    pub fn init_with(&mut self, extra: u64) -> Result<InitReply, FsError> {
        let mut a = [0u8; 64];
        a[0..4].copy_from_slice(&KERNEL_VERSION.to_le_bytes());
        a[4..8].copy_from_slice(&KERNEL_MINOR_VERSION.to_le_bytes());
        a[8..12].copy_from_slice(&(128u32 * 1024).to_le_bytes());
        // ASYNC_READ | POSIX_LOCKS | ATOMIC_O_TRUNC | EXPORT_SUPPORT | BIG_WRITES
        // | DO_READDIRPLUS | READDIRPLUS_AUTO | PARALLEL_DIROPS | MAX_PAGES | SUBMOUNTS
        // | INIT_EXT
        let flags: u64 = 1
            | 2
            | 8
            | 16
            | 32
            | (1 << 13)
            | (1 << 14)
            | (1 << 18)
            | (1 << 22)
            | (1 << 27)
            | (1 << 30)
            | extra;
        a[12..16].copy_from_slice(&(flags as u32).to_le_bytes());
        a[16..20].copy_from_slice(&((flags >> 32) as u32).to_le_bytes());
        let body = self.call(op::INIT, 0, &[&a], 64)?;
        let mut r = Rd(&body, 0);
        let major = r.u32()?;
        let minor = r.u32()?;
        let _max_readahead = r.u32()?;
        let flags_lo = r.u32()?;
        let _bg = r.u32()?;
        let _congestion = r.u32()?;
        let max_write = r.u32()?;
        let mut flags = u64::from(flags_lo);
        if body.len() >= 40 {
            let mut r2 = Rd(&body, 36);
            flags |= u64::from(r2.u32()?) << 32;
        }
        let reply = InitReply {
            major,
            minor,
            max_write,
            flags,
        };
        self.init = Some(reply);
        Ok(reply)
    }

    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<Entry, FsError> {
        let n = cstr(name);
        let body = self.call(op::LOOKUP, parent, &[&n], 128)?;
        let e = parse_entry(&mut Rd(&body, 0))?;
        // Node ID 0 is a negative entry: "no such name", which the guest
        // may cache for the entry timeout.
        if e.nodeid == 0 {
            return Err(FsError::Errno(libc::ENOENT));
        }
        Ok(e)
    }

    pub fn getattr(&mut self, node: u64) -> Result<Attr, FsError> {
        let a = [0u8; 16];
        let body = self.call(op::GETATTR, node, &[&a], 104)?;
        let mut r = Rd(&body, 16);
        parse_attr(&mut r)
    }

    fn open_common(&mut self, opcode: u32, node: u64, flags: u32) -> Result<u64, FsError> {
        let mut a = [0u8; 8];
        a[0..4].copy_from_slice(&flags.to_le_bytes());
        let body = self.call(opcode, node, &[&a], 16)?;
        Rd(&body, 0).u64()
    }

    /// OPEN; returns the file handle.
    pub fn open(&mut self, node: u64, flags: u32) -> Result<u64, FsError> {
        self.open_common(op::OPEN, node, flags)
    }

    /// OPENDIR; returns the directory handle.
    pub fn opendir(&mut self, node: u64) -> Result<u64, FsError> {
        self.open_common(op::OPENDIR, node, libc::O_RDONLY as u32)
    }

    /// OPENDIR; returns the directory handle and the reply's open flags
    /// (FOPEN_*: how the guest may cache the listing).
    pub fn opendir_flags(&mut self, node: u64) -> Result<(u64, u32), FsError> {
        let a = (libc::O_RDONLY as u32).to_le_bytes();
        let body = self.call(op::OPENDIR, node, &[&a, &[0u8; 4]], 16)?;
        let mut r = Rd(&body, 0);
        Ok((r.u64()?, r.u32()?))
    }

    /// fuse_read_in, shared by READ, READDIR and READDIRPLUS.
    pub fn read_in(fh: u64, offset: u64, size: u32) -> [u8; 40] {
        let mut a = [0u8; 40];
        a[0..8].copy_from_slice(&fh.to_le_bytes());
        a[8..16].copy_from_slice(&offset.to_le_bytes());
        a[16..20].copy_from_slice(&size.to_le_bytes());
        a
    }

    pub fn read(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let a = Self::read_in(fh, offset, size);
        self.call(op::READ, node, &[&a], size)
    }

    pub fn write(&mut self, node: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let mut a = [0u8; 40];
        a[0..8].copy_from_slice(&fh.to_le_bytes());
        a[8..16].copy_from_slice(&offset.to_le_bytes());
        a[16..20].copy_from_slice(&(data.len() as u32).to_le_bytes());
        let body = self.call(op::WRITE, node, &[&a, data], 8)?;
        Rd(&body, 0).u32()
    }

    /// CREATE; returns the new entry and its file handle.
    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        flags: u32,
    ) -> Result<(Entry, u64), FsError> {
        let mut a = [0u8; 16];
        a[0..4].copy_from_slice(&flags.to_le_bytes());
        a[4..8].copy_from_slice(&mode.to_le_bytes());
        let n = cstr(name);
        let body = self.call(op::CREATE, parent, &[&a, &n], 128 + 16)?;
        let mut r = Rd(&body, 0);
        let e = parse_entry(&mut r)?;
        let fh = r.u64()?;
        Ok((e, fh))
    }

    pub fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<Entry, FsError> {
        let mut a = [0u8; 8];
        a[0..4].copy_from_slice(&mode.to_le_bytes());
        let n = cstr(name);
        let body = self.call(op::MKDIR, parent, &[&a, &n], 128)?;
        parse_entry(&mut Rd(&body, 0))
    }

    /// MKNOD: a device node, FIFO or socket (`mode` carries the type).
    pub fn mknod(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        rdev: u32,
    ) -> Result<Entry, FsError> {
        let mut a = [0u8; 16];
        a[0..4].copy_from_slice(&mode.to_le_bytes());
        a[4..8].copy_from_slice(&rdev.to_le_bytes());
        let n = cstr(name);
        let body = self.call(op::MKNOD, parent, &[&a, &n], 128)?;
        parse_entry(&mut Rd(&body, 0))
    }

    pub fn unlink(&mut self, parent: u64, name: &str) -> Result<(), FsError> {
        self.call(op::UNLINK, parent, &[&cstr(name)], 0).map(|_| ())
    }

    pub fn readlink(&mut self, node: u64) -> Result<Vec<u8>, FsError> {
        self.call(op::READLINK, node, &[], 4096)
    }

    /// STATFS; returns (blocks, bfree, files).
    pub fn statfs(&mut self, node: u64) -> Result<(u64, u64, u64), FsError> {
        let body = self.call(op::STATFS, node, &[], 80)?;
        let mut r = Rd(&body, 0);
        let blocks = r.u64()?;
        let bfree = r.u64()?;
        let _bavail = r.u64()?;
        let files = r.u64()?;
        Ok((blocks, bfree, files))
    }

    pub fn release(&mut self, node: u64, fh: u64) -> Result<(), FsError> {
        let mut a = [0u8; 24];
        a[0..8].copy_from_slice(&fh.to_le_bytes());
        self.call(op::RELEASE, node, &[&a], 0).map(|_| ())
    }

    pub fn releasedir(&mut self, node: u64, fh: u64) -> Result<(), FsError> {
        let mut a = [0u8; 24];
        a[0..8].copy_from_slice(&fh.to_le_bytes());
        self.call(op::RELEASEDIR, node, &[&a], 0).map(|_| ())
    }

    /// FORGET on the high-priority queue; it has no reply, so the device
    /// returns the chain with zero bytes written.
    pub fn forget(&mut self, node: u64, nlookup: u64) -> Result<(), FsError> {
        let unique = self.next_unique();
        let hdr = in_header((IN_HEADER_LEN + 8) as u32, op::FORGET, unique, node);
        let n = nlookup.to_le_bytes();
        self.hiprio.call(&[&hdr, &n], &[], self.shape)?;
        Ok(())
    }

    /// BATCH_FORGET on the high-priority queue, as a guest kernel sends when
    /// it drops inodes under memory pressure: (node, lookups) pairs.
    pub fn batch_forget(&mut self, nodes: &[(u64, u64)]) -> Result<(), FsError> {
        // Keep each message well inside the hiprio slot.
        for chunk in nodes.chunks(200) {
            let unique = self.next_unique();
            let (hdr, body) = batch_forget_request(unique, chunk);
            self.hiprio.call(&[&hdr, &body], &[], self.shape)?;
        }
        Ok(())
    }

    /// One READDIRPLUS call: the records that fit `size` bytes from `offset`.
    pub fn readdirplus(
        &mut self,
        node: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<DirEntryPlus>, FsError> {
        let a = Self::read_in(fh, offset, size);
        let body = self.call(op::READDIRPLUS, node, &[&a], size)?;
        parse_direntplus(&body)
    }

    /// One READDIR call: (offset, name) of the records that fit `size`
    /// bytes from `offset`.
    pub fn readdir(
        &mut self,
        node: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, FsError> {
        let a = Self::read_in(fh, offset, size);
        let body = self.call(op::READDIR, node, &[&a], size)?;
        let mut out = Vec::new();
        let mut at = 0;
        while at < body.len() {
            // fuse_dirent: ino, off, namelen, type, then the name.
            let mut r = Rd(&body, at);
            let _ino = r.u64()?;
            let off = r.u64()?;
            let namelen = r.u32()? as usize;
            let _typ = r.u32()?;
            let name = body.get(r.1..r.1 + namelen).ok_or_else(|| {
                FsError::Malformed(format!("name of {namelen} bytes runs past the reply"))
            })?;
            out.push((off, name.to_vec()));
            at = (r.1 + namelen).next_multiple_of(8);
        }
        Ok(out)
    }

    /// Every entry of a directory, READDIRPLUS after READDIRPLUS.
    pub fn readdirplus_all(&mut self, node: u64) -> Result<Vec<DirEntryPlus>, FsError> {
        let fh = self.opendir(node)?;
        let mut all = Vec::new();
        let mut off = 0;
        loop {
            let batch = self.readdirplus(node, fh, off, 64 * 1024)?;
            let Some(last) = batch.last() else { break };
            off = last.off;
            all.extend(batch);
        }
        self.releasedir(node, fh)?;
        Ok(all)
    }
}

/// Parse a READDIRPLUS reply body into records.
pub fn parse_direntplus(body: &[u8]) -> Result<Vec<DirEntryPlus>, FsError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let mut r = Rd(body, at);
        let entry = parse_entry(&mut r)?;
        let ino = r.u64()?;
        let off = r.u64()?;
        let namelen = r.u32()? as usize;
        let typ = r.u32()?;
        let name = body
            .get(r.1..r.1 + namelen)
            .ok_or_else(|| {
                FsError::Malformed(format!("name of {namelen} bytes runs past the reply"))
            })?
            .to_vec();
        out.push(DirEntryPlus {
            entry,
            ino,
            off,
            typ,
            name,
        });
        at = (r.1 + namelen).next_multiple_of(8);
    }
    Ok(out)
}

/// A BATCH_FORGET request: its header and its body (fuse_batch_forget_in
/// followed by one fuse_forget_one per node).
pub fn batch_forget_request(unique: u64, nodes: &[(u64, u64)]) -> ([u8; IN_HEADER_LEN], Vec<u8>) {
    let mut body = Vec::with_capacity(8 + 16 * nodes.len());
    body.extend_from_slice(&(nodes.len() as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    for (node, n) in nodes {
        body.extend_from_slice(&node.to_le_bytes());
        body.extend_from_slice(&n.to_le_bytes());
    }
    (
        in_header(
            (IN_HEADER_LEN + body.len()) as u32,
            op::BATCH_FORGET,
            unique,
            0,
        ),
        body,
    )
}

/// A name as FUSE sends it: NUL-terminated.
/// The arguments of a RENAME2 of `old` in `parent` to `new` in `newdir`
/// (fuse_rename2_in, then both names).
pub fn rename2_args(newdir: u64, old: &str, new: &str, flags: u32) -> Vec<u8> {
    let mut a = Vec::with_capacity(16 + old.len() + new.len() + 2);
    a.extend_from_slice(&newdir.to_le_bytes());
    a.extend_from_slice(&flags.to_le_bytes());
    a.extend_from_slice(&0u32.to_le_bytes());
    a.extend_from_slice(&cstr(old));
    a.extend_from_slice(&cstr(new));
    a
}

pub fn cstr(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(name.len() + 1);
    v.extend_from_slice(name.as_bytes());
    v.push(0);
    v
}

/// A tmpfs mounted at `dir` (made if missing) until dropped: a second
/// filesystem inside a share. Needs root; None (a skip, or a failure
/// under CI) without it.
pub struct TmpfsMount(std::path::PathBuf);

impl TmpfsMount {
    pub fn new(dir: &std::path::Path) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::require::<()>(Err("mounting a tmpfs in the share needs root".into()));
            return None;
        }
        std::fs::create_dir_all(dir).expect("the mount point");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount runs");
        assert!(st.success(), "mount -t tmpfs tmpfs {}", dir.display());
        Some(TmpfsMount(dir.to_path_buf()))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
