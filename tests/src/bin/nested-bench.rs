//! `nested-bench`: vmm-core against QEMU with KVM (microvm and q35), side
//! by side in one outer guest of the nested AMD-V bed: the same kernel,
//! initramfs, memory and vCPUs, alternating, several rounds. Prints JSON:
//! per VMM the median time from exec to the inner guest's /init (its
//! init's start marker) and to the end of its command (its exit marker),
//! and vmm-core's own resident memory (guest memory excluded), with the
//! ratios to QEMU microvm.
//!
//! Times are emulation times (TCG under nested KVM): compare them only as
//! ratios within one run.
//!
//! ```sh
//! cargo build --release --workspace && target/release/nested-bench --rounds 5
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tests::nested::Bed;

#[derive(Debug, Parser)]
struct Args {
    /// Rounds; each boots every VMM once, in a rotating order.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// vCPUs of the inner guest.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Memory of the inner guest, MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
}

/// Run one VMM ($1: its name) with its command line ($2...), and print
/// `T NAME ROUND init|exit SECONDS` as the inner guest reaches /init and
/// the end of its command, and `RSS NAME ROUND KIB` (vmm-core only: its
/// anonymous and file-backed memory, the shared guest memory left out).
const OUTER_FNS: &str = r#"
up() { cut -d' ' -f1 /proc/uptime; }
timed() {
    name=$1; round=$2; shift 2
    rm -f /tmp/out; mkfifo /tmp/out
    t0=$(up)
    "$@" > /tmp/out 2>&1 &
    pid=$!
    (while read -r line; do
        case "$line" in
        *TESTBED-START*) echo "T $name $round init $(awk -v a=$t0 -v b=$(up) 'BEGIN { print b - a }')" ;;
        *TESTBED-EXIT*) echo "T $name $round exit $(awk -v a=$t0 -v b=$(up) 'BEGIN { print b - a }')" ;;
        esac
    done < /tmp/out) &
    reader=$!
    max=0
    while kill -0 $pid 2>/dev/null; do
        if [ "$name" = vmm-core ]; then
            kib=$(awk '/^RssAnon|^RssFile/ { s += $2 } END { print s + 0 }' /proc/$pid/status 2>/dev/null)
            [ "${kib:-0}" -gt "$max" ] && max=$kib
        fi
        sleep 0.1
    done
    wait $reader
    [ "$name" = vmm-core ] && echo "RSS $name $round $max"
}
"#;

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let bed = Bed::new(&["vmm-core"], "true")
        .map_err(anyhow::Error::msg)?
        .with_qemu()
        .map_err(anyhow::Error::msg)?;
    let append = "console=ttyS0 reboot=k panic=1 quiet";
    let qemu = |machine: &str| {
        format!(
            "qemu-system-x86_64 -L /nested/qemu -M {machine} -enable-kvm -cpu host -m {} -smp {} \
             -nodefaults -no-user-config -display none -no-reboot -serial stdio \
             -kernel /nested/vmlinuz -initrd /nested/inner.cpio -append '{append}'",
            a.memory_mib, a.cpus
        )
    };
    let vmms = [
        (
            "vmm-core",
            format!(
                "vmm-core --kernel /nested/vmlinuz --initramfs /nested/inner.cpio --cpus {} \
                 --memory {}M --serial stdio --cmdline '{append}'",
                a.cpus, a.memory_mib
            ),
        ),
        ("qemu-microvm", qemu("microvm")),
        ("qemu-q35", qemu("q35")),
    ];
    let mut script = OUTER_FNS.to_string();
    for round in 0..a.rounds {
        for k in 0..vmms.len() {
            let (name, cmd) = &vmms[(k + round as usize) % vmms.len()];
            script.push_str(&format!("timed {name} {round} {cmd}\n"));
        }
    }
    eprintln!(
        "nested-bench: {} rounds of {} VMMs in one outer guest...",
        a.rounds,
        vmms.len()
    );
    let run = bed
        .run(&script, Duration::from_secs(3000))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut times: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut rss: Vec<f64> = Vec::new();
    for l in run.script_lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["T", name, _round, what, secs] => times
                .entry((name.to_string(), what.to_string()))
                .or_default()
                .push(secs.parse().context("a time")?),
            ["RSS", _name, _round, kib] => rss.push(kib.parse().context("an RSS")?),
            _ => {}
        }
    }
    if times.is_empty() {
        bail!("no timings in the outer guest's output:\n{}", run.serial);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    let mut out = serde_json::Map::new();
    let mut medians = BTreeMap::new();
    for ((name, what), mut v) in times {
        let m = median(&mut v);
        medians.insert((name.clone(), what.clone()), m);
        out.insert(
            format!("{name}.{what}_s"),
            serde_json::json!({ "median": m, "all": v }),
        );
    }
    for what in ["init", "exit"] {
        if let (Some(core), Some(micro)) = (
            medians.get(&("vmm-core".into(), what.into())),
            medians.get(&("qemu-microvm".into(), what.into())),
        ) {
            out.insert(
                format!("ratio.{what}.vmm-core_to_microvm"),
                serde_json::json!(core / micro),
            );
        }
    }
    if !rss.is_empty() {
        let m = median(&mut rss);
        out.insert(
            "vmm-core.rss_kib".into(),
            serde_json::json!({ "median": m, "all": rss }),
        );
    }
    out.insert("rounds".into(), serde_json::json!(a.rounds));
    out.insert("cpus".into(), serde_json::json!(a.cpus));
    out.insert("memory_mib".into(), serde_json::json!(a.memory_mib));
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
