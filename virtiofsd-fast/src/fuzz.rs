//! The request path as a function of guest bytes, for fuzzing: a share in a
//! directory, one queue in plain memory, and each input served as one
//! descriptor chain, exactly as the queue threads serve a guest's.
//!
//! Used by the cargo-fuzz target in `virtiofsd-fast/fuzz` and by a test that
//! runs mutated seeds on every CI run.

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::args::{Args, Config};
use crate::backend::FsBackend;
use crate::share::ShareFs;

const QUEUE_SIZE: u16 = 8;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const REQUEST: u64 = 0x10000;
/// Largest request a fuzz input becomes (the rest is cut).
pub const MAX_REQUEST: usize = 0x20000;
const REPLY: u64 = REQUEST + MAX_REQUEST as u64;
const REPLY_LEN: u32 = 0x20000;
const MEM_SIZE: usize = 0x80000;

/// One device, one queue, one share.
pub struct Harness {
    backend: FsBackend,
    mem: GuestMemoryMmap,
    queue: Queue,
    next_avail: u16,
}

impl Harness {
    /// Serve `share` without sandbox (the fuzzer runs unprivileged) in
    /// the default cache mode.
    pub fn new(share: &Path) -> io::Result<Self> {
        let share_arg = format!("--shared-dir={}", share.display());
        let args = Args::try_parse_from([
            "virtiofsd-fast",
            "--socket-path=/nonexistent",
            &share_arg,
            "--sandbox=none",
            "--seccomp=none",
        ])
        .map_err(io::Error::other)?;
        let cfg = Config::try_from(args).map_err(io::Error::other)?;
        let fs = ShareFs::new(&cfg, &cfg.shared_dir.to_string_lossy())?;
        fs.import()?;
        let backend = FsBackend::new(fs, cfg.tag.clone(), 1, Duration::ZERO);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .map_err(io::Error::other)?;
        let mut queue = Queue::new(QUEUE_SIZE).map_err(io::Error::other)?;
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_size(QUEUE_SIZE);
        queue.set_ready(true);
        Ok(Harness {
            backend,
            mem,
            queue,
            next_avail: 0,
        })
    }

    /// Serve `input` as one request. The first byte picks where the readable
    /// part is split into two descriptors (so headers split across
    /// descriptors are covered); the rest is the request. Returns the bytes
    /// the device wrote, or `None` if the chain did not come back.
    pub fn request(&mut self, input: &[u8]) -> Option<u32> {
        let (split, body) = match input.split_first() {
            Some((s, b)) => (*s as usize, &b[..b.len().min(MAX_REQUEST)]),
            None => (0, input),
        };
        self.mem.write_slice(body, GuestAddress(REQUEST)).ok()?;
        let first = split.min(body.len()) as u32;
        let mut descs: Vec<(u64, u32, u16)> = Vec::new();
        if first > 0 {
            descs.push((REQUEST, first, 0));
        }
        if (body.len() as u32) > first {
            descs.push((REQUEST + u64::from(first), body.len() as u32 - first, 0));
        }
        descs.push((REPLY, REPLY_LEN, 2));
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&(flags | if last { 0 } else { 1 }).to_le_bytes());
            d[14..16].copy_from_slice(&(if last { 0 } else { i as u16 + 1 }).to_le_bytes());
            self.mem
                .write_slice(&d, GuestAddress(DESC + 16 * i as u64))
                .ok()?;
        }
        let slot = AVAIL + 4 + 2 * u64::from(self.next_avail % QUEUE_SIZE);
        self.mem.write_obj(0u16, GuestAddress(slot)).ok()?;
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .store(self.next_avail, GuestAddress(AVAIL + 2), Ordering::Release)
            .ok()?;
        let chain = self.queue.pop_descriptor_chain(&self.mem)?;
        let head = chain.head_index();
        let written = self.backend.handle_chain(&&self.mem, chain);
        self.queue.add_used(&self.mem, head, written).ok()?;
        Some(written)
    }

    /// The reply bytes of the last request.
    pub fn reply(&self, len: u32) -> Vec<u8> {
        let mut v = vec![0u8; len.min(REPLY_LEN) as usize];
        let _ = self.mem.read_slice(&mut v, GuestAddress(REPLY));
        v
    }
}

/// A FUSE request as the guest kernel lays it out.
pub fn fuse_request(opcode: u32, unique: u64, nodeid: u64, args: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(40 + args.len());
    v.extend_from_slice(&((40 + args.len()) as u32).to_le_bytes());
    v.extend_from_slice(&opcode.to_le_bytes());
    v.extend_from_slice(&unique.to_le_bytes());
    v.extend_from_slice(&nodeid.to_le_bytes());
    v.extend_from_slice(&[0u8; 16]);
    v.extend_from_slice(args);
    v
}

/// Seeds: a session's worth of well-formed requests to mutate from.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut init = vec![0u8; 64];
    init[0..4].copy_from_slice(&7u32.to_le_bytes());
    init[4..8].copy_from_slice(&38u32.to_le_bytes());
    let mut read_in = vec![0u8; 40];
    read_in[16..20].copy_from_slice(&4096u32.to_le_bytes());
    let mut create_in = vec![0u8; 16];
    create_in[0..4].copy_from_slice(&(libc::O_RDWR as u32).to_le_bytes());
    create_in[4..8].copy_from_slice(&0o644u32.to_le_bytes());
    create_in.extend_from_slice(b"fuzzed\0");
    let mut mkdir_in = vec![0u8; 8];
    mkdir_in[0..4].copy_from_slice(&0o755u32.to_le_bytes());
    mkdir_in.extend_from_slice(b"dir\0");
    let mut rename_in = 1u64.to_le_bytes().to_vec();
    rename_in.extend_from_slice(b"fuzzed\0renamed\0");
    let with_split = |s: u8, r: Vec<u8>| {
        let mut v = vec![s];
        v.extend(r);
        v
    };
    vec![
        with_split(40, fuse_request(26, 2, 0, &init)),
        with_split(40, fuse_request(1, 4, 1, b"file\0")),
        with_split(40, fuse_request(3, 6, 1, &[0u8; 16])),
        with_split(17, fuse_request(27, 8, 1, &[0u8; 8])),
        with_split(40, fuse_request(44, 10, 1, &read_in)),
        with_split(0, fuse_request(35, 12, 1, &create_in)),
        with_split(40, fuse_request(9, 14, 1, &mkdir_in)),
        with_split(40, fuse_request(12, 16, 1, &rename_in)),
        with_split(40, fuse_request(10, 18, 1, b"renamed\0")),
        with_split(40, fuse_request(17, 20, 1, &[])),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a fresh INIT (a guest may FORGET even the root), a valid
    /// GETATTR of the root must succeed.
    fn still_serves(h: &mut Harness) {
        h.request(&seeds()[0]).expect("INIT comes back");
        let mut req = vec![40u8];
        req.extend(fuse_request(3, 0xfeed, 1, &[0u8; 16]));
        let n = h.request(&req).expect("the chain comes back");
        let reply = h.reply(n);
        assert!(reply.len() >= 16, "no reply header");
        assert_eq!(
            i32::from_le_bytes(reply[4..8].try_into().unwrap()),
            0,
            "GETATTR of the root failed"
        );
    }

    #[test]
    fn seeds_are_served() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"data").unwrap();
        let mut h = Harness::new(dir.path()).unwrap();
        for s in seeds() {
            let n = h.request(&s).expect("every chain comes back");
            assert!(n >= 16, "a well-formed request gets at least a header");
        }
        still_serves(&mut h);
    }

    /// Mutated seeds, a few thousand per CI run: bit flips, cuts, lying
    /// lengths, random opcodes. The daemon must answer every chain and
    /// keep serving. Deeper runs: `cargo fuzz run request` in ../fuzz.
    #[test]
    fn mutated_requests_never_stop_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"data").unwrap();
        let mut h = Harness::new(dir.path()).unwrap();
        let seeds = seeds();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for i in 0..4000 {
            let mut input = seeds[i % seeds.len()].clone();
            match next() % 6 {
                0 => {
                    let at = (next() as usize) % input.len();
                    input[at] ^= 1 << (next() % 8);
                }
                1 => input.truncate((next() as usize) % input.len()),
                2 => {
                    // The header's length field, from the start of the body.
                    let len = (next() % 0x30000) as u32;
                    input[1..5].copy_from_slice(&len.to_le_bytes());
                }
                3 => {
                    let op = (next() % 64) as u32;
                    input[5..9].copy_from_slice(&op.to_le_bytes());
                }
                4 => {
                    let node = next() % 8;
                    input[17..25].copy_from_slice(&node.to_le_bytes());
                }
                _ => input.extend((0..(next() % 64)).map(|_| next() as u8)),
            }
            assert!(h.request(&input).is_some(), "input {i} lost its chain");
        }
        still_serves(&mut h);
    }
}
