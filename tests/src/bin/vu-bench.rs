//! vu-bench: run a named workload against one or more vhost-user backends,
//! side by side in one run, and print JSON (requests/s, p50/p99 latency,
//! bytes/s, and each backend's ratio to the first).
//!
//! Examples:
//!   vu-bench fs-lookup-getattr --backend virtiofsd
//!   vu-bench fs-lookup-getattr --backend virtiofsd-fast --backend virtiofsd --rounds 3
//!   vu-bench blk-randread --qd 32 --backend qsd --backend 'mine=blk-backend --fd={fd} --image={image}'
//!   vu-bench net-tx --frame-size 64 --backend raw-tap --backend net-backend   (root: makes a tap)

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde::Serialize;

use tests::bench::{self, BlkPattern, Limit, Report};
use tests::frontend::{find_program, BackendProcess};
use tests::netbench;

#[derive(Clone, Copy, Debug, ValueEnum, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum Workload {
    /// LOOKUP of files by name alternating with GETATTR (virtio-fs).
    FsLookupGetattr,
    /// OPENDIR/READDIRPLUS/RELEASEDIR walk of the whole tree (virtio-fs).
    FsReaddirplusWalk,
    /// Sequential READ of one large file (virtio-fs).
    FsReadSeq,
    /// Random reads of --bs bytes (virtio-blk).
    BlkRandread,
    /// Random writes of --bs bytes (virtio-blk).
    BlkRandwrite,
    /// Sequential reads of --bs bytes (virtio-blk).
    BlkSeqread,
    /// Sequential writes of --bs bytes (virtio-blk).
    BlkSeqwrite,
    /// Frames of --frame-size bytes from the guest into a tap (virtio-net).
    NetTx,
    /// Frames of --frame-size bytes from the host side of a tap into the
    /// guest (virtio-net).
    NetRx,
}

impl Workload {
    fn is_net(self) -> bool {
        matches!(self, Workload::NetTx | Workload::NetRx)
    }

    fn is_fs(self) -> bool {
        matches!(
            self,
            Workload::FsLookupGetattr | Workload::FsReaddirplusWalk | Workload::FsReadSeq
        )
    }
}

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Benchmark vhost-user backends side by side through the test frontend"
)]
struct Args {
    /// The workload to run.
    workload: Workload,
    /// A backend: a preset (virtiofsd, virtiofsd-fast, qsd, qsd-buffered,
    /// blk-backend, blk-backend-buffered, net-backend, and raw-tap: no
    /// backend, a plain loop on the tap) or
    /// NAME=COMMAND LINE with {fd} (or {socket}), {dir}, {image}, {cache},
    /// {queues}, {tap} placeholders. Repeat to compare; ratios are against
    /// the first.
    #[arg(long = "backend", required = true)]
    backends: Vec<String>,
    /// Seconds per backend per round.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Stop after this many requests (per backend per round).
    #[arg(long, default_value_t = u64::MAX)]
    max_requests: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 1)]
    qd: usize,
    /// Rounds; backends alternate within each round and the median is kept.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// fs: directories in the tree.
    #[arg(long, default_value_t = 100)]
    dirs: usize,
    /// fs: files per directory.
    #[arg(long, default_value_t = 100)]
    files: usize,
    /// fs: cache mode passed to the presets.
    #[arg(long, default_value = "auto")]
    cache: String,
    /// fs: size of the file for fs-read-seq, in MiB.
    #[arg(long, default_value_t = 256)]
    file_mib: u64,
    /// Block size for blk workloads and chunk size for fs-read-seq, in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: u32,
    /// blk: image size in MiB (created sparse, then filled once for reads).
    #[arg(long, default_value_t = 1024)]
    image_mib: u64,
    /// blk: queues the device is set up with (load goes to queue 0).
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// net: Ethernet frame size in bytes; above 1514 the frames are TCP
    /// segments sent whole with TSO (up to 65535, the largest the kernel
    /// passes whole).
    #[arg(long, default_value_t = 1514)]
    frame_size: usize,
    /// net: frame buffers the plain tap loop (raw-tap) cycles through;
    /// 0, the default, means as many as --qd, the memory the backend's
    /// frames in flight occupy. 1 is one cache-hot buffer, which flatters
    /// the loop at 64 KiB frames (BENCHMARKS.md).
    #[arg(long, default_value_t = 0)]
    raw_buffers: usize,
    /// net: the tap to create for the run.
    #[arg(long, default_value = "vubench0")]
    tap: String,
    /// Where the tree and the image live (a real disk, not tmpfs).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn preset(name: &str) -> Option<String> {
    let bin = |n: &str| {
        // Prefer this workspace's release build, then PATH/cargo bin.
        let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let local = here.parent().map(|p| p.join("target/release").join(n));
        local
            .filter(|p| p.is_file())
            .or_else(|| find_program(n))
            .map(|p| p.to_string_lossy().into_owned())
    };
    Some(match name {
        "virtiofsd" => format!("{} --fd={{fd}} --shared-dir={{dir}} --cache={{cache}} --sandbox=namespace", bin("virtiofsd")?),
        "virtiofsd-fast" => format!("{} --fd={{fd}} --shared-dir={{dir}} --cache={{cache}}", bin("virtiofsd-fast")?),
        "qsd" => format!(
            "{} --blockdev driver=file,node-name=f,filename={{image}},aio=io_uring,cache.direct=on \
             --export type=vhost-user-blk,id=e,node-name=f,addr.type=fd,addr.str={{fd}},writable=on,num-queues={{queues}}",
            bin("qemu-storage-daemon")?
        ),
        "qsd-buffered" => format!(
            "{} --blockdev driver=file,node-name=f,filename={{image}},aio=io_uring,cache.direct=off \
             --export type=vhost-user-blk,id=e,node-name=f,addr.type=fd,addr.str={{fd}},writable=on,num-queues={{queues}}",
            bin("qemu-storage-daemon")?
        ),
        "blk-backend" => format!("{} --fd={{fd}} --image={{image}} --num-queues={{queues}} --direct", bin("blk-backend")?),
        "blk-backend-buffered" => format!("{} --fd={{fd}} --image={{image}} --num-queues={{queues}}", bin("blk-backend")?),
        "net-backend" => format!("{} --fd={{fd}} --tap={{tap}}", bin("net-backend")?),
        "raw-tap" => "raw-tap".into(),
        _ => return None,
    })
}

struct Backend {
    name: String,
    argv: Vec<String>,
}

fn parse_backend(spec: &str, subst: &[(&str, String)]) -> Result<Backend> {
    let (name, cmd) = match spec.split_once('=') {
        Some((n, c)) if !n.contains(' ') && !n.contains('/') => (n.to_string(), c.to_string()),
        _ => match preset(spec) {
            Some(c) => (spec.to_string(), c),
            None if matches!(
                spec,
                "virtiofsd"
                    | "virtiofsd-fast"
                    | "qsd"
                    | "qsd-buffered"
                    | "blk-backend"
                    | "blk-backend-buffered"
                    | "net-backend"
            ) =>
            {
                bail!("preset `{spec}`: its program is not installed or built (see README's set-up)")
            }
            None => bail!("`{spec}` is neither a preset (virtiofsd, virtiofsd-fast, qsd, qsd-buffered, blk-backend, blk-backend-buffered) net-backend, raw-tap) nor NAME=COMMAND"),
        },
    };
    let argv = cmd
        .split_whitespace()
        .map(|a| {
            subst
                .iter()
                .fold(a.to_string(), |acc, (k, v)| acc.replace(k, v))
        })
        .collect();
    Ok(Backend { name, argv })
}

#[derive(Serialize)]
struct Output {
    workload: Workload,
    date: String,
    host: String,
    params: serde_json::Value,
    results: Vec<Report>,
    rounds: Vec<Vec<Report>>,
    /// Per backend: its median over the first backend's (requests/s, p50).
    ratios: Vec<serde_json::Value>,
}

fn run_one(w: Workload, a: &Args, b: &Backend, limit: Limit) -> Result<Report> {
    let dir = if w == Workload::NetTx {
        netbench::Direction::Tx
    } else {
        netbench::Direction::Rx
    };
    let cmd = b.argv.join(" ");
    if b.argv == ["raw-tap"] {
        anyhow::ensure!(w.is_net(), "raw-tap is a baseline for the net workloads");
        let buffers = if a.raw_buffers == 0 {
            a.qd
        } else {
            a.raw_buffers
        };
        return netbench::raw_tap(&a.tap, dir, a.frame_size, buffers.max(1), limit)
            .map(|s| s.report(&b.name, "plain loop on the tap"))
            .context("the raw tap loop");
    }
    if w.is_net() {
        netbench::wait_tap_gone(&a.tap);
    }
    let mut proc = BackendProcess::spawn(&b.argv, Duration::from_secs(20))
        .with_context(|| format!("starting backend {}", b.name))?;
    let pattern = |write, random| BlkPattern {
        write,
        random,
        block: a.bs,
    };
    let result = match w {
        Workload::FsLookupGetattr => {
            bench::fs_lookup_getattr(&mut proc, a.dirs, a.files, a.qd, limit)
                .map(|s| s.report(&b.name, &cmd))
        }
        Workload::FsReaddirplusWalk => bench::fs_readdirplus_walk(&mut proc, limit).map(|w| {
            let kinds = [
                ("p50_us_opendir", w.opendir.p50_us()),
                ("p50_us_listing", w.listing.p50_us()),
                ("p50_us_end", w.end.p50_us()),
                ("p50_us_releasedir", w.releasedir.p50_us()),
            ];
            let mut r = w.all.report(&b.name, &cmd);
            r.extra
                .insert("entries_per_s".into(), w.entries as f64 / r.seconds);
            for (k, v) in kinds {
                r.extra.insert(k.into(), v);
            }
            r
        }),
        Workload::FsReadSeq => bench::fs_read_seq(&mut proc, "big.bin", a.bs, a.qd, limit)
            .map(|s| s.report(&b.name, &cmd)),
        Workload::BlkRandread => {
            bench::blk_io(&mut proc, a.queues, pattern(false, true), a.qd, limit)
                .map(|s| s.report(&b.name, &cmd))
        }
        Workload::BlkRandwrite => {
            bench::blk_io(&mut proc, a.queues, pattern(true, true), a.qd, limit)
                .map(|s| s.report(&b.name, &cmd))
        }
        Workload::BlkSeqread => {
            bench::blk_io(&mut proc, a.queues, pattern(false, false), a.qd, limit)
                .map(|s| s.report(&b.name, &cmd))
        }
        Workload::BlkSeqwrite => {
            bench::blk_io(&mut proc, a.queues, pattern(true, false), a.qd, limit)
                .map(|s| s.report(&b.name, &cmd))
        }
        Workload::NetTx | Workload::NetRx => {
            netbench::backend(&mut proc, &a.tap, dir, a.frame_size, a.qd, limit)
                .map(|s| s.report(&b.name, &cmd))
        }
    };
    result.with_context(|| format!("backend {} output:\n{}", b.name, proc.output()))
}

fn median(mut v: Vec<Report>) -> Report {
    v.sort_by(|x, y| x.requests_per_s.total_cmp(&y.requests_per_s));
    v.swap_remove(v.len() / 2)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let w = a.workload;
    let dir = a.dir.clone().unwrap_or_else(bench::scratch_dir);
    let tree = dir.join(format!("tree-{}x{}", a.dirs, a.files));
    let image = dir.join(format!("image-{}m.raw", a.image_mib));
    if w.is_fs() {
        eprintln!("vu-bench: preparing tree {}", tree.display());
        bench::ensure_tree(&tree, a.dirs, a.files).context("building the file tree")?;
        if w == Workload::FsReadSeq {
            let big = tree.join("big.bin");
            if std::fs::metadata(&big).map(|m| m.len()).unwrap_or(0) != a.file_mib << 20 {
                eprintln!("vu-bench: writing {} MiB file", a.file_mib);
                std::fs::write(&big, vec![0x5au8; (a.file_mib << 20) as usize])?;
            }
        }
    } else if !w.is_net() {
        std::fs::create_dir_all(&dir)?;
        if std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0) != a.image_mib << 20 {
            // Filled, not sparse: reads of holes would not touch the disk.
            eprintln!(
                "vu-bench: writing {} MiB image {}",
                a.image_mib,
                image.display()
            );
            let chunk = vec![0x3cu8; 1 << 20];
            let mut f = std::fs::File::create(&image)?;
            for _ in 0..a.image_mib {
                std::io::Write::write_all(&mut f, &chunk)?;
            }
            f.sync_all()?;
        }
    }
    let subst = [
        ("{dir}", tree.to_string_lossy().into_owned()),
        ("{image}", image.to_string_lossy().into_owned()),
        ("{cache}", a.cache.clone()),
        ("{queues}", a.queues.to_string()),
        ("{tap}", a.tap.clone()),
    ];
    let backends: Vec<Backend> = a
        .backends
        .iter()
        .map(|s| parse_backend(s, &subst))
        .collect::<Result<_>>()?;
    let limit = Limit {
        duration: Duration::from_secs_f64(a.seconds),
        max_requests: a.max_requests,
    };

    let mut rounds = Vec::new();
    for r in 0..a.rounds.max(1) {
        let mut this = Vec::new();
        // Alternate the order each round so neither backend always runs on
        // the warmer page cache.
        let order: Vec<usize> = if r % 2 == 0 {
            (0..backends.len()).collect()
        } else {
            (0..backends.len()).rev().collect()
        };
        for &i in &order {
            let b = &backends[i];
            eprintln!(
                "vu-bench: round {}/{} {} on {}",
                r + 1,
                a.rounds.max(1),
                serde_json::to_string(&w)?,
                b.name
            );
            if !w.is_fs() && !w.is_net() && !direct(&b.argv) {
                // The same start for every backend: the image clean and all
                // in the host page cache. A backend with O_DIRECT reads the
                // disk whatever is cached, and reading the image through just
                // before its slot would only add disk traffic to its time.
                bench::warm_page_cache(&image)?;
            }
            let rep = run_one(w, &a, b, limit)?;
            eprintln!(
                "vu-bench:   {:>12.0} req/s  p50 {:>8.1} us  p99 {:>8.1} us  {:>8.1} MB/s  {:>6.2} Gbit/s",
                rep.requests_per_s,
                rep.p50_us,
                rep.p99_us,
                rep.bytes_per_s / 1e6,
                rep.bytes_per_s * 8.0 / 1e9
            );
            // The walk's medians by request kind.
            let kinds: Vec<String> = rep
                .extra
                .iter()
                .filter_map(|(k, v)| Some(format!("{} {v:.1}", k.strip_prefix("p50_us_")?)))
                .collect();
            if !kinds.is_empty() {
                eprintln!("vu-bench:   p50 us by kind: {}", kinds.join("  "));
            }
            this.push((i, rep));
        }
        this.sort_by_key(|(i, _)| *i);
        rounds.push(this.into_iter().map(|(_, r)| r).collect::<Vec<_>>());
    }
    let results: Vec<Report> = (0..backends.len())
        .map(|i| median(rounds.iter().map(|r| r[i].clone()).collect()))
        .collect();
    let base = &results[0];
    let ratios = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name,
                "vs": base.name,
                "requests_per_s": r.requests_per_s / base.requests_per_s.max(1e-9),
                "p50": r.p50_us / base.p50_us.max(1e-9),
            })
        })
        .collect();
    let out = Output {
        workload: w,
        date: now_utc(),
        host: host_summary(),
        params: serde_json::json!({
            "seconds": a.seconds, "qd": a.qd, "rounds": a.rounds, "dirs": a.dirs, "files": a.files,
            "cache": a.cache, "bs": a.bs, "queues": a.queues, "image_mib": a.image_mib,
            "frame_size": a.frame_size, "raw_buffers": a.raw_buffers,
        }),
        results,
        rounds,
        ratios,
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn host_summary() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{n} cpus, {cpu}")
}

/// Whether a block backend's command line asks for O_DIRECT.
fn direct(cmd: &[String]) -> bool {
    cmd.iter()
        .any(|a| a == "--direct" || a.contains("cache.direct=on"))
}
