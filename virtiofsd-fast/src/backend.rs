//! The vhost-user side: virtqueues in, FUSE requests to the server, replies
//! out. Queue 0 is the high-priority queue, 1.. are request queues; each has
//! its own worker thread and its own vring lock, so queues never contend.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use backend_common::FaultCounter;
use fuse_backend_rs::abi::fuse_abi::{CopyFileRangeIn, InHeader, Opcode, OutHeader, WriteOut};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Address, ByteValued, Bytes, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::share::ShareFs;

/// VIRTIO_F_VERSION_1.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_INDIRECT_DESC.
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Queue size the device offers; Linux and QEMU ask for 1024 at most.
pub const QUEUE_SIZE: usize = 1024;
/// Tag field of the virtio-fs config space.
const TAG_LEN: usize = 36;

/// Counts of what went wrong, for logs that stay readable under a hostile guest.
#[derive(Default)]
pub struct Faults {
    pub bad_chains: FaultCounter,
    pub bad_requests: FaultCounter,
}

/// The virtio-fs device.
pub struct FsBackend {
    server: Server<Arc<ShareFs>>,
    /// The filesystem itself, for the requests the server does not know.
    fs: Arc<ShareFs>,
    mem: backend_common::MemorySlot,
    event_idx: AtomicBool,
    request_queues: usize,
    tag: String,
    /// How long a queue thread watches its ring after the last request
    /// before it sleeps until the next kick.
    poll: Duration,
    pub faults: Faults,
    /// Requests served per FUSE opcode (the last slot: unknown opcodes),
    /// logged and reset when a frontend goes.
    requests: [AtomicU64; OPCODES + 1],
    /// The high-priority queue (FORGET, INTERRUPT) of the connection, once
    /// its thread has seen it: a request thread that is polling its own
    /// ring serves that one too, so a FORGET batch costs no thread a
    /// wake-up and the poller is still awake for the next request.
    hiprio: RwLock<Option<VringRwLock>>,
    /// With `--thread-pool-size`: where request-queue threads hand the
    /// requests they take, for the pool's threads to serve and return.
    pool: OnceLock<mpsc::Sender<Job>>,
}

/// After a listing with entries, the poll window is this many times
/// `--poll-us`.
const LISTING_POLL_FACTOR: u32 = 4;

/// How long a polled ring must have been quiet before its thread spends
/// time closing released directories.
const CLOSE_WHEN_QUIET: Duration = Duration::from_micros(10);

/// A request taken from a ring, for a pool thread.
struct Job {
    chain: virtio_queue::DescriptorChain<Mem>,
    mem: Mem,
    vring: VringRwLock,
}

type Mem = vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap>;

/// FUSE opcodes counted one by one (FUSE_LOOKUP = 1 .. FUSE_STATX = 52).
const OPCODES: usize = 53;
/// FUSE_COPY_FILE_RANGE and FUSE_SYNCFS, served here: fuse-backend-rs's
/// server answers ENOSYS to both.
const FUSE_COPY_FILE_RANGE: u32 = Opcode::CopyFileRange as u32;
const FUSE_SYNCFS: u32 = 50;
/// FUSE_SETXATTR: served here once FUSE_SETXATTR_EXT is agreed, since
/// fuse-backend-rs's server reads the older, shorter header.
const FUSE_SETXATTR: u32 = Opcode::Setxattr as u32;
const FUSE_INIT: u32 = Opcode::Init as u32;
/// FUSE_SETXATTR_EXT in fuse_init_in/out's flags (fuse-backend-rs 0.14's
/// FsOptions has no name for it).
const SETXATTR_EXT: u32 = 1 << 29;
/// Where fuse_init_out's flags sit in an INIT reply: after the out header,
/// major, minor and max_readahead.
const INIT_OUT_FLAGS_AT: usize = std::mem::size_of::<OutHeader>() + 12;
/// The largest SETXATTR body: a name (XATTR_NAME_MAX 255 and its NUL) and
/// a value of XATTR_SIZE_MAX.
const SETXATTR_BODY_MAX: usize = 256 + 65536;

impl FsBackend {
    pub fn new(fs: ShareFs, tag: String, request_queues: usize, poll: Duration) -> Self {
        let fs = Arc::new(fs);
        FsBackend {
            server: Server::new(fs.clone()),
            fs,
            mem: backend_common::MemorySlot::default(),
            event_idx: AtomicBool::new(false),
            request_queues: request_queues.max(1),
            tag,
            poll,
            faults: Faults::default(),
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            hiprio: RwLock::new(None),
            pool: OnceLock::new(),
        }
    }

    /// Serve the request queues' requests on `threads` threads of their
    /// own instead of on each queue's thread, so one request that blocks
    /// (a FIFO opened with no writer, a read from a slow disk) does not
    /// hold up the ones behind it. The queue threads then only take
    /// requests off their rings.
    pub fn start_pool(self: &Arc<Self>, threads: usize) -> io::Result<()> {
        if threads == 0 {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            let me = Arc::clone(self);
            std::thread::Builder::new()
                .name(format!("fs-pool-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    me.serve_job(job);
                })?;
        }
        let _ = self.pool.set(tx);
        Ok(())
    }

    fn serve_job(&self, job: Job) {
        let head = job.chain.head_index();
        let written = self.handle_chain(&job.mem, job.chain);
        let mut state = job.vring.get_mut();
        if let Err(e) = state.add_used(head, written) {
            warn!(queue_head = head, error = %e, "cannot return a used buffer");
            return;
        }
        if !self.event_idx.load(Ordering::Relaxed) || state.needs_notification().unwrap_or(true) {
            if let Err(e) = state.signal_used_queue() {
                debug!(error = %e, "cannot signal the guest");
            }
        }
        drop(state);
        crate::share::close_released();
    }

    /// Hand every request on `vring` to the pool. Returns false when there
    /// is no pool.
    fn dispatch(&self, vring: &VringRwLock) -> bool {
        let Some(tx) = self.pool.get() else {
            return false;
        };
        let Some(mem) = self.mem.memory() else {
            return true;
        };
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else {
                return true;
            };
            let job = Job {
                chain,
                mem: mem.clone(),
                vring: vring.clone(),
            };
            if tx.send(job).is_err() {
                return true;
            }
        }
    }

    /// Watch `vring` (with its kicks off) for up to the poll window after
    /// its last request, serving the high-priority queue meanwhile when it
    /// has work. Returns whether `vring` has a request again.
    fn poll(&self, vring: &VringRwLock) -> bool {
        if self.poll.is_zero() {
            return false;
        }
        let hiprio = self.hiprio.read().ok().and_then(|h| h.clone());
        // A listing that returned entries is always followed by another
        // READDIRPLUS of the same directory (the guest reads on until one
        // comes back empty), and the guest first digests what it got: a
        // 100-entry page takes it longer than the plain window.
        let window = if crate::share::take_listing_continues() {
            self.poll * LISTING_POLL_FACTOR
        } else {
            self.poll
        };
        let mut last = Instant::now();
        let mut deadline = last + window;
        loop {
            match self.mem.ring_pending(vring) {
                Some(true) => return true,
                Some(false) => {}
                None => return false,
            }
            if let Some(h) = &hiprio {
                if self.mem.ring_pending(h) == Some(true) && self.process_queue(h).is_ok() {
                    last = Instant::now();
                    deadline = last + self.poll;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // A ring quiet for a while: close a released directory now,
            // while nothing waits for this thread.
            if now.duration_since(last) >= CLOSE_WHEN_QUIET {
                crate::share::close_one_released();
            }
            backend_common::poll_pause();
        }
    }

    /// The requests counted since the last call, by opcode name, most
    /// frequent first; the counters start again from zero.
    pub fn take_request_counts(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .requests
            .iter()
            .enumerate()
            .filter_map(|(op, c)| {
                let n = c.swap(0, Ordering::Relaxed);
                (n > 0).then(|| (opcode_name(op), n))
            })
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// The device config space: tag, then the number of request queues.
    fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; TAG_LEN + 4];
        let t = self.tag.as_bytes();
        c[..t.len().min(TAG_LEN)].copy_from_slice(&t[..t.len().min(TAG_LEN)]);
        c[TAG_LEN..].copy_from_slice(&(self.request_queues as u32).to_le_bytes());
        c
    }

    /// Serve every chain the guest has made available on `vring`.
    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.mem.memory() else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        let mut used_any = false;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
            let head = chain.head_index();
            let written = self.handle_chain(&mem, chain);
            if let Err(e) = state.add_used(head, written) {
                // The used ring itself is unusable: nothing more can be
                // returned on this queue until the frontend resets it.
                warn!(queue_head = head, error = %e, "cannot return a used buffer");
                break;
            }
            used_any = true;
        }
        if used_any
            && (!self.event_idx.load(Ordering::Relaxed)
                || state.needs_notification().unwrap_or(true))
        {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    /// One FUSE request. Returns the bytes written to the guest; a chain
    /// that cannot be read or answered is returned with 0 bytes (the guest
    /// sees an I/O error) and counted.
    pub fn handle_chain<M>(&self, mem: &M, chain: virtio_queue::DescriptorChain<M>) -> u32
    where
        M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
    {
        // Linux puts the header in a descriptor of its own: read it from
        // there, rather than cloning the reader (an allocation per request).
        let header = chain
            .clone()
            .readable()
            .next()
            .filter(|d| d.len() as usize >= std::mem::size_of::<InHeader>())
            .and_then(|d| mem.read_obj::<InHeader>(d.addr()).ok());
        let reader = match Reader::from_descriptor_chain(&**mem, chain.clone()) {
            Ok(r) => r,
            Err(e) => return self.bad_chain(&e),
        };
        // An INIT reply may need a flag added after the server wrote it.
        let init_chain = header
            .filter(|h| h.opcode == FUSE_INIT)
            .map(|_| chain.clone());
        let mut writer = match VirtioFsWriter::new(&**mem, chain) {
            Ok(w) => Writer::VirtioFs(w),
            Err(e) => return self.bad_chain(&e),
        };
        // The guest's kernel sets the header's length to exactly what it
        // sends; a length beyond the chain is a lie the FUSE layer would
        // not notice for requests whose arguments are shorter.
        let readable = reader.available_bytes();
        // A header split across descriptors is rare; peek at it the slow way.
        let header = header.or_else(|| reader.clone().read_obj::<InHeader>().ok());
        if let Some(h) = header {
            let slot = (h.opcode as usize).min(OPCODES);
            self.requests[slot].fetch_add(1, Ordering::Relaxed);
            if h.len as usize > readable {
                if let Some(count) = self.faults.bad_requests.hit() {
                    warn!(
                        claimed = h.len,
                        readable,
                        opcode = h.opcode,
                        count,
                        "FUSE header length beyond the request"
                    );
                }
                return reply_error(&mut writer, h.unique, libc::EINVAL);
            }
            if matches!(h.opcode, 0 | 7 | 19) {
                // Numbers FUSE never used: fuse-backend-rs's server would
                // turn them into an Opcode it has no variant for (undefined
                // behaviour, in its trace log), so they are refused here.
                return reply_error(&mut writer, h.unique, libc::ENOSYS);
            }
            if matches!(h.opcode, FUSE_COPY_FILE_RANGE | FUSE_SYNCFS)
                || (h.opcode == FUSE_SETXATTR && self.fs.setxattr_ext())
            {
                return self.serve_here(&h, reader, &mut writer);
            }
        }
        // What the guest offers at INIT, for the flag the server cannot
        // name (read before the server consumes the request).
        let init = init_chain.and_then(|c| Some((c, init_in_flags(reader.clone())?)));
        match self.server.handle_message(reader, writer, None, None) {
            Ok(n) => {
                if let Some((chain, offered)) = init {
                    self.agree_setxattr_ext(&**mem, &chain, offered, n);
                }
                u32::try_from(n).unwrap_or(u32::MAX)
            }
            Err(e) => {
                if let Some(count) = self.faults.bad_requests.hit() {
                    warn!(error = %e, count, "malformed FUSE request");
                }
                0
            }
        }
    }

    /// The requests fuse-backend-rs's server would refuse.
    fn serve_here(&self, h: &InHeader, mut r: Reader<'_>, w: &mut Writer<'_, ()>) -> u32 {
        // The header was peeked, not consumed.
        if r.read_obj::<InHeader>().is_err() {
            return reply_error(w, h.unique, libc::EINVAL);
        }
        let result = match h.opcode {
            FUSE_COPY_FILE_RANGE => match r.read_obj::<CopyFileRangeIn>() {
                Ok(a) => self
                    .fs
                    .copy_file_range(
                        h.nodeid,
                        a.fh_in,
                        a.offset_in,
                        a.nodeid_out,
                        a.fh_out,
                        a.offset_out,
                        a.len,
                        a.flags,
                    )
                    .map(|n| {
                        let out = WriteOut {
                            size: n as u32,
                            padding: 0,
                        };
                        out.as_slice().to_vec()
                    }),
                Err(_) => Err(io::Error::from_raw_os_error(libc::EINVAL)),
            },
            FUSE_SETXATTR => self.setxattr_ext(h, &mut r).map(|()| Vec::new()),
            // fuse_syncfs_in is 8 bytes of padding: nothing to read.
            _ => self.fs.syncfs(h.nodeid).map(|()| Vec::new()),
        };
        match result {
            Ok(body) => {
                let out = OutHeader {
                    len: (std::mem::size_of::<OutHeader>() + body.len()) as u32,
                    error: 0,
                    unique: h.unique,
                };
                let mut reply = out.as_slice().to_vec();
                reply.extend_from_slice(&body);
                match std::io::Write::write_all(w, &reply) {
                    Ok(()) => reply.len() as u32,
                    Err(_) => 0,
                }
            }
            Err(e) => reply_error(w, h.unique, e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    /// SETXATTR with FUSE_SETXATTR_EXT's header: fuse_setxattr_in (size,
    /// flags, setxattr_flags, padding), then the name and its NUL, then
    /// `size` bytes of value.
    fn setxattr_ext(&self, h: &InHeader, r: &mut Reader<'_>) -> io::Result<()> {
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        let mut head = [0u8; 16];
        std::io::Read::read_exact(r, &mut head).map_err(|_| einval())?;
        let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap());
        let (size, flags, setxattr_flags) = (word(0), word(4), word(8));
        let body_len = (h.len as usize)
            .checked_sub(std::mem::size_of::<InHeader>() + head.len())
            .ok_or_else(einval)?;
        if body_len > SETXATTR_BODY_MAX {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        let mut body = vec![0u8; body_len];
        std::io::Read::read_exact(r, &mut body).map_err(|_| einval())?;
        let nul = body.iter().position(|&b| b == 0).ok_or_else(einval)?;
        let (name, value) = body.split_at(nul + 1);
        if value.len() != size as usize {
            return Err(einval());
        }
        let name = std::ffi::CStr::from_bytes_with_nul(name).map_err(|_| einval())?;
        self.fs
            .setxattr_flags(h.nodeid, name, value, flags, setxattr_flags)
    }

    /// After the server answered INIT (`written` bytes): where the guest
    /// offered FUSE_SETXATTR_EXT and took POSIX ACLs, add the flag to the
    /// reply, so the guest says which ACL changes must drop the
    /// set-group-ID bit.
    fn agree_setxattr_ext<M: vm_memory::GuestMemory>(
        &self,
        mem: &M,
        chain: &virtio_queue::DescriptorChain<impl std::ops::Deref<Target = M> + Clone>,
        offered: u32,
        written: usize,
    ) {
        let want = offered & SETXATTR_EXT != 0 && self.fs.acl_enabled();
        let agreed = want
            && written >= INIT_OUT_FLAGS_AT + 4
            && patch_reply_u32(mem, chain, INIT_OUT_FLAGS_AT, |f| f | SETXATTR_EXT);
        self.fs.set_setxattr_ext(agreed);
    }

    fn bad_chain(&self, e: &dyn std::fmt::Display) -> u32 {
        if let Some(count) = self.faults.bad_chains.hit() {
            warn!(error = %e, count, "unusable descriptor chain");
        }
        0
    }
}

/// fuse_init_in's flags, from a request whose header has not been read.
fn init_in_flags(mut r: Reader<'_>) -> Option<u32> {
    let mut b = [0u8; std::mem::size_of::<InHeader>() + 16];
    std::io::Read::read_exact(&mut r, &mut b).ok()?;
    let at = std::mem::size_of::<InHeader>() + 12;
    Some(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()))
}

/// Rewrite the little-endian u32 at byte `offset` of what the device
/// wrote into `chain`'s writable buffers. False where the chain has no
/// whole word there.
fn patch_reply_u32<M: vm_memory::GuestMemory>(
    mem: &M,
    chain: &virtio_queue::DescriptorChain<impl std::ops::Deref<Target = M> + Clone>,
    offset: usize,
    f: impl FnOnce(u32) -> u32,
) -> bool {
    let mut skip = offset as u64;
    for d in chain.clone().writable() {
        let len = u64::from(d.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        if skip + 4 > len {
            return false;
        }
        let Some(at) = d.addr().checked_add(skip) else {
            return false;
        };
        return match mem.read_obj::<u32>(at) {
            Ok(v) => mem.write_obj(f(u32::from_le(v)).to_le(), at).is_ok(),
            Err(_) => false,
        };
    }
    false
}

/// The kernel's name for a FUSE opcode, without the FUSE_ prefix.
fn opcode_name(op: usize) -> String {
    match op {
        // Not opcodes: fuse-backend-rs's `From<u32>` would transmute them
        // into values its enum does not have.
        0 | 7 | 19 => return format!("OPCODE{op}"),
        50 => return "SYNCFS".into(),
        51 => return "TMPFILE".into(),
        52 => return "STATX".into(),
        _ if op >= OPCODES => return "unknown".into(),
        _ => {}
    }
    // "BatchForget" -> "BATCH_FORGET"
    let mut name = String::new();
    for (i, ch) in format!("{:?}", Opcode::from(op as u32)).chars().enumerate() {
        if i > 0 && ch.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(ch.to_ascii_uppercase());
    }
    name
}

/// Logs what the guest asked for when its frontend goes: a quick picture
/// of a workload (a walk that sends 20 LOOKUPs per READDIRPLUS is not
/// getting its dentries from READDIRPLUS).
pub struct Hooks(pub SharedBackend);

impl backend_common::ConnectionHooks<SharedBackend> for Hooks {
    fn end(&self) {
        // The next frontend brings rings of its own.
        *self.0.hiprio.write().unwrap_or_else(|e| e.into_inner()) = None;
        let counts = self.0.take_request_counts();
        let total: u64 = counts.iter().map(|c| c.1).sum();
        let by_opcode = counts
            .iter()
            .map(|(op, n)| format!("{op}={n}"))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::info!(total, by_opcode, "requests served");
    }
}

/// Answer a request with only a fuse_out_header carrying `errno`.
fn reply_error(w: &mut Writer<'_, ()>, unique: u64, errno: i32) -> u32 {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&16u32.to_le_bytes());
    h[4..8].copy_from_slice(&(-errno).to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    match std::io::Write::write_all(w, &h) {
        Ok(()) => 16,
        Err(_) => 0,
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1 + self.request_queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        backend_common::config_slice(&self.config_space(), offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem.set(mem)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue.
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected events {evset:?}")));
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!(
                "event for queue {device_event}, which does not exist"
            )));
        };
        // One queue per thread: the thread's index is the queue's (a kick's
        // event number counts within the thread's own rings).
        debug!(queue = thread, "kick");
        if thread == 0 {
            let mut h = self.hiprio.write().unwrap_or_else(|e| e.into_inner());
            if h.is_none() {
                *h = Some(vring.clone());
            }
        }
        if self.event_idx.load(Ordering::Relaxed) {
            // Re-check after re-enabling notifications: a request made
            // available in between would otherwise wait for the next kick.
            loop {
                vring.disable_notification().map_err(io::Error::other)?;
                if thread == 0 || !self.dispatch(vring) {
                    self.process_queue(vring)?;
                }
                // With kicks still off, watch the ring a little longer: a
                // guest that sends its next request soon sends it without a
                // kick, and we take it without a wake-up from epoll.
                // The high-priority queue's own thread does not watch
                // it: a polling request thread does (see `poll`).
                let polled = thread != 0 && self.poll(vring);
                if polled {
                    continue;
                }
                if !vring.enable_notification().map_err(io::Error::other)? {
                    break;
                }
            }
        } else if thread == 0 || !self.dispatch(vring) {
            self.process_queue(vring)?;
        }
        // Before this thread sleeps: close what the replies released.
        crate::share::close_released();
        Ok(())
    }
}

/// The backend as the serve loop clones it into each connection.
pub type SharedBackend = Arc<FsBackend>;

#[cfg(test)]
mod tests {
    #[test]
    fn opcodes_are_named_as_the_kernel_names_them() {
        assert_eq!(super::opcode_name(1), "LOOKUP");
        assert_eq!(super::opcode_name(42), "BATCH_FORGET");
        assert_eq!(super::opcode_name(47), "COPY_FILE_RANGE");
        assert_eq!(super::opcode_name(50), "SYNCFS");
        assert_eq!(super::opcode_name(7), "OPCODE7");
        assert_eq!(super::opcode_name(4096), "unknown");
    }
}
