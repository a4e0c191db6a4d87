//! guest-bench: shared-folder workloads inside a real Linux guest (QEMU),
//! for several virtio-fs backends in one run, printed as JSON.
//!
//! Each backend gets a fresh guest and, where the host allows it, a cold
//! host page cache. Inside the guest: `find` cold, `find` again at once
//! (warm), `find` after the 1 s coherence window, `ls -lR`, creating files,
//! reading one large file; and, as the physical limit, the same `find` over
//! a copy of the tree in the guest's own tmpfs. With `--tmpfs`, the warm
//! `find` over the share and over tmpfs then alternate `--repeats` times in
//! the same guest and their medians and minima are reported
//! (`share_find_warm_median`, `tmpfs_find_warm_min`, ...): one guest's
//! tmpfs time moves a lot from boot to boot and even from run to run, so
//! only a comparison inside one guest says much.
//!
//!   guest-bench --backend 'fast=virtiofsd-fast --cache=coherent' \
//!               --backend 'virtiofsd=virtiofsd --cache=auto'

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

use tests::bench;
use tests::frontend::BackendProcess;
use tests::guest::{self, Qemu};

#[derive(Parser, Debug)]
#[command(about = "Shared-folder workloads in a real guest, several backends side by side")]
struct Args {
    /// NAME=PROGRAM [FLAGS...]: PROGRAM is virtiofsd-fast, virtiofsd or a
    /// path; `--fd` and `--shared-dir` are added. Repeat to compare.
    #[arg(long = "backend", required = true)]
    backends: Vec<String>,
    /// Directories in the tree.
    #[arg(long, default_value_t = 200)]
    dirs: usize,
    /// Files per directory.
    #[arg(long, default_value_t = 100)]
    files: usize,
    /// Files the create workload makes.
    #[arg(long, default_value_t = 20000)]
    creates: usize,
    /// Size of the file the read workload reads, in MiB (0: skip).
    #[arg(long, default_value_t = 1024)]
    read_mib: u64,
    /// Also time `find` over a copy of the tree in the guest's tmpfs.
    #[arg(long)]
    tmpfs: bool,
    /// With --tmpfs: how many times the warm share/tmpfs pair is timed.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Where the tree lives (a real disk).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    name: String,
    cmd: String,
    host_cache_dropped: bool,
    seconds: BTreeMap<String, f64>,
}

fn program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    let here = std::env::current_exe().ok()?;
    let beside = here.parent()?.join(name);
    if beside.is_file() {
        return Some(beside);
    }
    tests::find_program(name)
}

/// The median and the least of the values whose keys are `prefix`
/// followed by a number.
fn median_min(seconds: &BTreeMap<String, f64>, prefix: &str) -> Option<(f64, f64)> {
    let mut v: Vec<f64> = seconds
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix(prefix)
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .map(|(_, &x)| x)
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some((v[v.len() / 2], v[0]))
}

fn drop_host_caches() -> bool {
    // Needs root; without it the "cold" runs are only guest-cold.
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

const SCRIPT: &str = r#"
mkdir -p /mnt/host && mount -t virtiofs share /mnt/host || exit 90
now() { cut -d' ' -f1 /proc/uptime; }
t() { a=$(now); "$@" > /dev/null 2>&1; b=$(now); echo "$a $b"; }
echo "find_cold: $(t find /mnt/host)"
echo "find_warm: $(t find /mnt/host)"
sleep 1.2
echo "find_after_window: $(t find /mnt/host)"
echo "ls_lR: $(t ls -lR /mnt/host)"
mkdir -p /mnt/host/.bench-create
a=$(now); i=0; while [ $i -lt CREATES ]; do : > /mnt/host/.bench-create/f$i; i=$((i+1)); done; b=$(now)
echo "create: $a $b"
rm -rf /mnt/host/.bench-create
if [ -e /mnt/host/.bench-big ]; then
  echo "read_big: $(t dd if=/mnt/host/.bench-big of=/dev/null bs=1M)"
fi
if [ TMPFS = 1 ]; then
  mkdir -p /tmp/copy && mount -t tmpfs tmpfs /tmp/copy && cp -a /mnt/host/d* /tmp/copy/
  echo "tmpfs_find_cold: $(t find /tmp/copy)"
  echo "tmpfs_find_warm: $(t find /tmp/copy)"
  # cp read every file, which leaves their access times to be fetched
  # again: one untimed walk, so the pairs below compare warm with warm.
  find /mnt/host > /dev/null
  i=0; while [ $i -lt REPEATS ]; do
    echo "share_find_warm_$i: $(t find /mnt/host)"
    echo "tmpfs_find_warm_$i: $(t find /tmp/copy)"
    i=$((i+1))
  done
fi
"#;

fn main() -> Result<()> {
    let a = Args::parse();
    if let Err(why) = guest::qemu_available() {
        bail!("cannot boot a guest: {why}");
    }
    let dir = a.dir.clone().unwrap_or_else(bench::scratch_dir);
    let tree = dir.join(format!("tree-{}x{}", a.dirs, a.files));
    eprintln!("guest-bench: preparing tree {}", tree.display());
    bench::ensure_tree(&tree, a.dirs, a.files)?;
    let big = tree.join(".bench-big");
    if a.read_mib > 0 && std::fs::metadata(&big).map(|m| m.len()).unwrap_or(0) != a.read_mib << 20 {
        eprintln!("guest-bench: writing a {} MiB file to read", a.read_mib);
        let chunk = vec![0x5au8; 1 << 20];
        let mut f = std::fs::File::create(&big)?;
        for _ in 0..a.read_mib {
            std::io::Write::write_all(&mut f, &chunk)?;
        }
    } else if a.read_mib == 0 {
        let _ = std::fs::remove_file(&big);
    }
    let script = SCRIPT
        .replace("CREATES", &a.creates.to_string())
        .replace("TMPFS", if a.tmpfs { "1" } else { "0" })
        .replace("REPEATS", &a.repeats.to_string());

    let mut rows = Vec::new();
    for spec in &a.backends {
        let (name, cmd) = spec
            .split_once('=')
            .context("--backend wants NAME=PROGRAM [FLAGS]")?;
        let mut words = cmd.split_whitespace();
        let prog = words.next().context("empty backend command")?;
        let bin =
            program(prog).with_context(|| format!("{prog} not found (build it, or install it)"))?;
        let mut argv = vec![
            bin.to_string_lossy().into_owned(),
            "--fd={fd}".into(),
            format!("--shared-dir={}", tree.display()),
        ];
        argv.extend(words.map(String::from));
        let dropped = drop_host_caches();
        eprintln!(
            "guest-bench: {name}: {} (host cache {})",
            argv.join(" "),
            if dropped { "dropped" } else { "kept" }
        );
        let backend = BackendProcess::spawn(&argv, Duration::from_secs(20))?;
        let qemu = Qemu::new().memory_mib(1024).fs(backend.socket(), "share");
        let run = bench::run_guest(&qemu, &script, name, &backend)?;
        let mut seconds = BTreeMap::new();
        for line in run.script_lines() {
            let Some((key, rest)) = line.split_once(": ") else {
                continue;
            };
            let v: Vec<f64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if let [t0, t1] = v[..] {
                seconds.insert(key.to_string(), ((t1 - t0) * 100.0).round() / 100.0);
            }
        }
        for what in ["share_find_warm", "tmpfs_find_warm"] {
            if let Some((median, min)) = median_min(&seconds, &format!("{what}_")) {
                seconds.insert(format!("{what}_median"), median);
                seconds.insert(format!("{what}_min"), min);
            }
        }
        eprintln!("guest-bench: {name}: {seconds:?}");
        // virtiofsd-fast logs what the guest asked for once it has gone.
        for _ in 0..20 {
            if let Some(l) = backend
                .output()
                .lines()
                .find(|l| l.contains("requests served"))
            {
                eprintln!("guest-bench: {name}: {l}");
                break;
            }
            if !backend.output().contains("virtiofsd-fast") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        rows.push(Row {
            name: name.into(),
            cmd: argv.join(" "),
            host_cache_dropped: dropped,
            seconds,
        });
    }
    let out = serde_json::json!({
        "workload": "guest-shared-folder",
        "tree": { "dirs": a.dirs, "files": a.files, "entries": a.dirs * (a.files + 1) + 1 },
        "results": rows,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
