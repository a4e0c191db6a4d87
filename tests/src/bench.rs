//! Workloads for `vu-bench`: closed-loop request drivers over the test
//! frontend, with latency percentiles and throughput.
//!
//! The same driver, the same guest memory layout and the same request bytes
//! are used for every backend, so the numbers of two backends measured in one
//! run differ only by the backend.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::blk::{self, BlkClient};
use crate::frontend::BackendProcess;
use crate::fs::{self, op, FuseClient, ROOT_ID};
use crate::queue::{Completion, Copy, ReqQueue};

/// When a measurement stops.
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub duration: Duration,
    pub max_requests: u64,
}

/// What one backend achieved on one workload.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub name: String,
    pub cmd: String,
    pub requests: u64,
    pub seconds: f64,
    pub requests_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub bytes_per_s: f64,
    /// Workload-specific figures (entries/s for a directory walk, ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

/// Latencies and byte counts gathered by a driver.
#[derive(Default)]
pub struct Stats {
    lat_ns: Vec<u64>,
    bytes: u64,
    elapsed: Duration,
}

/// The `p` quantile of sorted nanosecond latencies, in µs (0 for none).
fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let i = ((sorted_ns.len() as f64 - 1.0) * p).round() as usize;
    sorted_ns[i] as f64 / 1000.0
}

impl Stats {
    pub fn record(&mut self, lat: Duration, bytes: u64) {
        self.lat_ns.push(lat.as_nanos() as u64);
        self.bytes += bytes;
    }

    /// The wall time the measurement took (drivers other than
    /// [`closed_loop`] set it themselves).
    pub fn set_elapsed(&mut self, d: Duration) {
        self.elapsed = d;
    }

    /// The median latency in µs (0 with nothing recorded), as [`Stats::report`] gives it.
    pub fn p50_us(&self) -> f64 {
        let mut v = self.lat_ns.clone();
        v.sort_unstable();
        percentile_us(&v, 0.5)
    }

    pub fn report(mut self, name: &str, cmd: &str) -> Report {
        self.lat_ns.sort_unstable();
        let pct = |p: f64| percentile_us(&self.lat_ns, p);
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        Report {
            name: name.into(),
            cmd: cmd.into(),
            requests: self.lat_ns.len() as u64,
            seconds: secs,
            requests_per_s: self.lat_ns.len() as f64 / secs,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            bytes_per_s: self.bytes as f64 / secs,
            extra: BTreeMap::new(),
        }
    }
}

/// Run a closed loop: keep `qd` requests in flight on `q` until `limit`.
/// `issue(q, seq)` pushes one request and returns its token and a tag (a
/// FUSE unique, say); `done` gets the completion with that tag back, checks
/// it and returns the payload bytes it moved.
pub fn closed_loop(
    q: &mut ReqQueue,
    qd: usize,
    limit: Limit,
    copy: Copy,
    mut issue: impl FnMut(&mut ReqQueue, u64) -> anyhow::Result<(u16, u64)>,
    mut done: impl FnMut(&Completion, u64) -> anyhow::Result<u64>,
) -> anyhow::Result<Stats> {
    let mut stats = Stats {
        lat_ns: Vec::with_capacity(1 << 16),
        ..Default::default()
    };
    let mut started: HashMap<u16, (Instant, u64)> = HashMap::with_capacity(qd * 2);
    let start = Instant::now();
    let deadline = start + limit.duration;
    let mut seq = 0u64;
    let mut issued = 0u64;
    // Prime the queue.
    while started.len() < qd && issued < limit.max_requests {
        let (t, tag) = issue(q, seq)?;
        started.insert(t, (Instant::now(), tag));
        seq += 1;
        issued += 1;
    }
    q.publish()?;
    while !started.is_empty() {
        let c = q.wait_with(copy)?;
        let now = Instant::now();
        let (t0, tag) = started
            .remove(&c.token)
            .ok_or_else(|| anyhow::anyhow!("completion for token {} not in flight", c.token))?;
        let bytes = done(&c, tag)?;
        stats.record(now - t0, bytes);
        if now < deadline && issued < limit.max_requests {
            let (t, tag) = issue(q, seq)?;
            started.insert(t, (Instant::now(), tag));
            seq += 1;
            issued += 1;
            q.publish()?;
        }
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}

/// Flush `path` and read it through, so a backend that goes through the
/// host page cache starts with the whole file there. This host gives page
/// cache back to its own host within minutes, so a file written or read a
/// while ago is mostly gone again: without this the first backend of a run
/// reads from the disk and the others from memory.
pub fn warm_page_cache(path: &Path) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    f.sync_all()?;
    let mut buf = vec![0u8; 1 << 20];
    while std::io::Read::read(&mut f, &mut buf)? > 0 {}
    Ok(())
}

/// Boot `qemu` with `script` for the benchmark of backend `name`: a guest
/// that does not come up brings the backend's output, a script that fails
/// brings the guest's serial log.
pub fn run_guest(
    qemu: &crate::guest::Qemu,
    script: &str,
    name: &str,
    backend: &BackendProcess,
) -> anyhow::Result<crate::guest::GuestRun> {
    use anyhow::Context;
    let run = qemu
        .run(script, Duration::from_secs(1800))
        .with_context(|| format!("{name}: backend output:\n{}", backend.output()))?;
    if run.exit_code != 0 {
        anyhow::bail!(
            "{name}: guest script failed ({}):\n{}",
            run.exit_code,
            run.serial
        );
    }
    Ok(run)
}

/// Build (or reuse) a tree of `dirs` directories with `files` files each
/// under `root`, named d{i}/f{j}. A stamp file records what was built.
pub fn ensure_tree(root: &Path, dirs: usize, files: usize) -> std::io::Result<()> {
    let stamp = root.join(".vu-bench-tree");
    let want = format!("{dirs} {files}\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    std::fs::create_dir_all(root)?;
    for d in 0..dirs {
        let dir = root.join(format!("d{d}"));
        std::fs::create_dir_all(&dir)?;
        for f in 0..files {
            let p = dir.join(format!("f{f}"));
            if !p.exists() {
                std::fs::write(&p, b"x")?;
            }
        }
        if d % 50 == 49 {
            eprintln!("vu-bench: tree {}/{dirs} directories", d + 1);
        }
    }
    std::fs::write(stamp, want)
}

/// Check a FUSE reply header: the unique matches and no error.
fn fuse_ok(c: &Completion, expected: u64) -> anyhow::Result<u64> {
    let h = &c.data;
    anyhow::ensure!(
        h.len() >= fs::OUT_HEADER_LEN,
        "short FUSE reply ({} bytes)",
        h.len()
    );
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let err = i32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    let unique = u64::from_le_bytes(h[8..16].try_into()?);
    anyhow::ensure!(
        unique == expected,
        "reply for unique {unique} where {expected} was sent"
    );
    anyhow::ensure!(err == 0, "FUSE error {err}");
    Ok(u64::from(len) - fs::OUT_HEADER_LEN as u64)
}

/// LOOKUP + GETATTR storm over a tree of `dirs` x `files`: LOOKUP of a
/// file by name in its directory alternates with GETATTR of a directory.
pub fn fs_lookup_getattr(
    backend: &mut BackendProcess,
    dirs: usize,
    files: usize,
    qd: usize,
    limit: Limit,
) -> anyhow::Result<Stats> {
    let mut fuse = FuseClient::connect(backend, qd.max(1))?;
    fuse.init()?;
    let dir_ids: Vec<u64> = (0..dirs)
        .map(|d| fuse.lookup(ROOT_ID, &format!("d{d}")).map(|e| e.nodeid))
        .collect::<Result<_, _>>()?;
    let names: Vec<Vec<u8>> = (0..files).map(|f| fs::cstr(&format!("f{f}"))).collect();
    let mut unique = 1u64 << 40;
    let getattr_in = [0u8; 16];
    let shape = fuse.shape;
    // Like a guest kernel under memory pressure, give back what was looked
    // up, so a storm over a large tree does not pin one host descriptor per
    // file for the whole run. Forgets go on the high-priority queue, in
    // batches, between completions.
    let mut looked_up: Vec<(u64, u64)> = Vec::with_capacity(FORGET_BATCH);
    let hiprio = &mut fuse.hiprio;
    let mut forget_unique = 1u64 << 50;
    closed_loop(
        &mut fuse.req,
        qd,
        limit,
        // Header plus the nodeid of a LOOKUP reply.
        Copy::Prefix(fs::OUT_HEADER_LEN + 8),
        |q, seq| {
            unique += 2;
            let d = (seq / 2) as usize;
            let dir = dir_ids[(d / files.max(1)) % dir_ids.len()];
            let token = if seq % 2 == 0 {
                let name = &names[d % names.len()];
                let hdr = fs::in_header(
                    (fs::IN_HEADER_LEN + name.len()) as u32,
                    op::LOOKUP,
                    unique,
                    dir,
                );
                q.push(&[&hdr, name], &[fs::OUT_HEADER_LEN as u32 + 128], shape)?
            } else {
                let hdr = fs::in_header((fs::IN_HEADER_LEN + 16) as u32, op::GETATTR, unique, dir);
                q.push(
                    &[&hdr, &getattr_in],
                    &[fs::OUT_HEADER_LEN as u32 + 104],
                    shape,
                )?
            };
            // Even sequence numbers are LOOKUPs: tag them for `done`.
            Ok((token, unique | (seq % 2 == 0) as u64))
        },
        |c, tag| {
            fuse_ok(c, tag & !1)?;
            if tag & 1 == 1 && c.data.len() >= fs::OUT_HEADER_LEN + 8 {
                let node = u64::from_le_bytes(c.data[16..24].try_into()?);
                looked_up.push((node, 1));
                if looked_up.len() >= FORGET_BATCH {
                    forget_unique += 2;
                    send_batch_forget(hiprio, forget_unique, &looked_up)?;
                    looked_up.clear();
                }
            }
            Ok(0)
        },
    )
}

/// Nodes given back per BATCH_FORGET by the benchmark drivers.
const FORGET_BATCH: usize = 200;

fn send_batch_forget(
    hiprio: &mut ReqQueue,
    unique: u64,
    nodes: &[(u64, u64)],
) -> anyhow::Result<()> {
    let (hdr, body) = fs::batch_forget_request(unique, nodes);
    hiprio.call(&[&hdr, &body], &[], crate::queue::Shape::DIRECT)?;
    Ok(())
}

/// What a READDIRPLUS walk measured: all requests, and each kind apart.
#[derive(Default)]
pub struct WalkStats {
    pub all: Stats,
    pub opendir: Stats,
    /// READDIRPLUS replies with entries.
    pub listing: Stats,
    /// The empty READDIRPLUS that ends each directory.
    pub end: Stats,
    pub releasedir: Stats,
    /// Directory entries seen.
    pub entries: u64,
}

/// READDIRPLUS walk of the whole tree (as `ls -lR` would), repeated until
/// the limit.
pub fn fs_readdirplus_walk(
    backend: &mut BackendProcess,
    limit: Limit,
) -> anyhow::Result<WalkStats> {
    let mut fuse = FuseClient::connect(backend, 1)?;
    fuse.init()?;
    let mut w = WalkStats::default();
    let start = Instant::now();
    let mut requests = 0u64;
    'walk: loop {
        let mut stack = vec![ROOT_ID];
        while let Some(dir) = stack.pop() {
            let t = Instant::now();
            let fh = fuse.opendir(dir)?;
            w.all.record(t.elapsed(), 0);
            w.opendir.record(t.elapsed(), 0);
            let mut off = 0;
            let mut done_with: Vec<(u64, u64)> = Vec::new();
            loop {
                let t = Instant::now();
                let batch = fuse.readdirplus(dir, fh, off, 64 * 1024)?;
                let took = t.elapsed();
                w.all.record(took, 0);
                let Some(last) = batch.last() else {
                    w.end.record(took, 0);
                    break;
                };
                w.listing.record(took, 0);
                off = last.off;
                for e in &batch {
                    if e.name == b"." || e.name == b".." || e.entry.nodeid == 0 {
                        continue;
                    }
                    w.entries += 1;
                    if e.entry.attr.mode & libc::S_IFMT == libc::S_IFDIR {
                        stack.push(e.entry.nodeid);
                    } else {
                        done_with.push((e.entry.nodeid, 1));
                    }
                }
            }
            // Give back the files, and this directory once it is walked, as
            // a guest does when it drops them; not timed.
            if dir != ROOT_ID {
                done_with.push((dir, 1));
            }
            fuse.batch_forget(&done_with)?;
            let t = Instant::now();
            fuse.releasedir(dir, fh)?;
            w.all.record(t.elapsed(), 0);
            w.releasedir.record(t.elapsed(), 0);
            requests += 3;
            if requests >= limit.max_requests {
                break 'walk;
            }
        }
        if start.elapsed() >= limit.duration {
            break;
        }
    }
    w.all.elapsed = start.elapsed();
    Ok(w)
}

/// Sequential READs of `file` (relative to the share root) in `chunk` bytes.
pub fn fs_read_seq(
    backend: &mut BackendProcess,
    file: &str,
    chunk: u32,
    qd: usize,
    limit: Limit,
) -> anyhow::Result<Stats> {
    let mut fuse = FuseClient::connect(backend, qd.max(1))?;
    fuse.init()?;
    let e = fuse.lookup(ROOT_ID, file)?;
    let size = e.attr.size.max(u64::from(chunk));
    let fh = fuse.open(e.nodeid, libc::O_RDONLY as u32)?;
    let mut unique = 1u64 << 40;
    let shape = fuse.shape;
    closed_loop(
        &mut fuse.req,
        qd,
        limit,
        Copy::Prefix(fs::OUT_HEADER_LEN),
        |q, seq| {
            unique += 2;
            let off = (seq * u64::from(chunk)) % size;
            let a = FuseClient::read_in(fh, off, chunk);
            let hdr = fs::in_header((fs::IN_HEADER_LEN + 40) as u32, op::READ, unique, e.nodeid);
            let t = q.push(&[&hdr, &a], &[fs::OUT_HEADER_LEN as u32 + chunk], shape)?;
            Ok((t, unique))
        },
        fuse_ok,
    )
}

/// Block I/O pattern.
#[derive(Clone, Copy, Debug)]
pub struct BlkPattern {
    pub write: bool,
    pub random: bool,
    pub block: u32,
}

/// Random or sequential block I/O against a backend's image of `size` bytes.
pub fn blk_io(
    backend: &mut BackendProcess,
    queues: usize,
    pattern: BlkPattern,
    qd: usize,
    limit: Limit,
) -> anyhow::Result<Stats> {
    let mut c = BlkClient::connect(backend, queues, qd.max(1), pattern.block)?;
    let cfg = c.config()?;
    let blocks = (cfg.capacity * blk::SECTOR) / u64::from(pattern.block);
    anyhow::ensure!(
        blocks > 0,
        "image smaller than one {}-byte block",
        pattern.block
    );
    let data = vec![0xa5u8; pattern.block as usize];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let shape = c.shape;
    let typ = if pattern.write {
        blk::req::OUT
    } else {
        blk::req::IN
    };
    closed_loop(
        &mut c.queues[0],
        qd,
        limit,
        Copy::Last,
        |q, seq| {
            let block = if pattern.random {
                // xorshift: cheap, and the same sequence for every backend.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % blocks
            } else {
                seq % blocks
            };
            let sector = block * u64::from(pattern.block) / blk::SECTOR;
            let hdr = blk::out_header(typ, sector);
            let t = if pattern.write {
                q.push(&[&hdr, &data], &[1], shape)?
            } else {
                q.push(&[&hdr], &[pattern.block, 1], shape)?
            };
            Ok((t, 0))
        },
        |c, _| {
            anyhow::ensure!(
                c.data.first() == Some(&blk::S_OK),
                "block request failed with status {:?}",
                c.data.first()
            );
            Ok(u64::from(pattern.block))
        },
    )
}

/// A scratch location for benchmark data on a real disk (not tmpfs):
/// `$VU_BENCH_DIR`, else `target/vu-bench` of the workspace.
pub fn scratch_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VU_BENCH_DIR") {
        return PathBuf::from(d);
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).join("target/vu-bench")
}
