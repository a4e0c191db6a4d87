//! A real Linux guest under QEMU (vhost-user-blk-pci) on disks served by
//! blk-backend: what the guest sees, a filesystem that survives a reboot
//! onto a fresh backend process, a read-only disk, discard and write-zeroes
//! reaching the image as holes, and concurrent writers verified on the host.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::frontend::BackendProcess;
use tests::guest::{self, GuestRun, Qemu, TOOL_RUN};

const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
const DISK: u64 = 256 << 20;

fn backend(img: &Path, extra: &[&str]) -> BackendProcess {
    let mut argv = vec![
        env!("CARGO_BIN_EXE_blk-backend").to_string(),
        "--fd={fd}".into(),
        format!("--image={}", img.display()),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    BackendProcess::spawn(&argv, Duration::from_secs(10)).expect("blk-backend starts")
}

fn boot(q: Qemu, b: &BackendProcess, script: &str) -> GuestRun {
    match q
        .blk(b.socket())
        .run(&format!("set -e\n{script}"), GUEST_TIMEOUT)
    {
        Ok(run) => run,
        Err(e) => panic!("{e}\n--- blk-backend ---\n{}", b.output()),
    }
}

fn line_after<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no `{key}` line in:\n{out}"))
        .trim()
}

fn disk_image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(DISK).unwrap();
    p
}

fn md5_of(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn a_filesystem_survives_a_reboot_onto_a_fresh_backend() {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path());
    // O_DIRECT with bounce buffers from 16 KiB (what `auto` picks on a
    // segment-bound disk), so the guest's large writes and reads go through
    // them; the host reads the image itself at the end.
    let direct = ["--direct", "--bounce=16384"];
    let b = backend(
        &img,
        &[&["--serial=vmm-disk-7", "--num-queues=2"][..], &direct].concat(),
    );
    let run = boot(
        Qemu::new().cpus(2),
        &b,
        r#"
echo "SIZE=$(cat /sys/block/vda/size)"
echo "SERIAL=$(cat /sys/block/vda/serial)"
echo "QUEUES=$(ls /sys/block/vda/mq | wc -l)"
echo "DISCARD=$(cat /sys/block/vda/queue/discard_max_bytes)"
mke2fs -q -F /dev/vda
mkdir -p /mnt/d
mount -t ext4 /dev/vda /mnt/d
for i in 1 2 3 4; do
  dd if=/dev/urandom of=/mnt/d/f$i bs=4k count=$((i * 97)) 2>/dev/null
done
mkdir /mnt/d/sub
dd if=/dev/urandom of=/mnt/d/sub/big bs=1M count=24 2>/dev/null
cd /mnt/d && md5sum f1 f2 f3 f4 sub/big > SUMS && cat SUMS | sed 's/^/SUM /'
cd /
sync
umount /mnt/d
"#,
    );
    assert_eq!(run.exit_code, 0, "{}", run.script_output());
    let out = run.script_output();
    assert_eq!(line_after(&out, "SIZE="), (DISK / 512).to_string());
    assert_eq!(line_after(&out, "SERIAL="), "vmm-disk-7");
    assert_eq!(line_after(&out, "QUEUES="), "2");
    assert_ne!(line_after(&out, "DISCARD="), "0", "discard is offered");
    let sums: Vec<(String, String)> = out
        .lines()
        .filter_map(|l| l.strip_prefix("SUM "))
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap().to_string(), w.next().unwrap().to_string())
        })
        .collect();
    assert_eq!(sums.len(), 5);
    drop(b);

    // A new backend process and a new guest: the files read back intact.
    let b = backend(&img, &direct);
    let run = boot(
        Qemu::new(),
        &b,
        r#"
mkdir -p /mnt/d
mount -t ext4 /dev/vda /mnt/d
cd /mnt/d
if md5sum -c SUMS; then echo VERIFY=ok; else echo VERIFY=bad; fi
cd /
umount /mnt/d
"#,
    );
    let out = run.script_output();
    assert_eq!(line_after(&out, "VERIFY="), "ok", "{out}");
    drop(b);

    // The host checks the image: a clean filesystem, and the same bytes.
    if let Some(fsck) = tests::require_program("e2fsck", "apt-get install e2fsprogs") {
        let st = Command::new(fsck).arg("-fn").arg(&img).output().unwrap();
        assert!(
            st.status.success(),
            "e2fsck: {}{}",
            String::from_utf8_lossy(&st.stdout),
            String::from_utf8_lossy(&st.stderr)
        );
    }
    if let Some(debugfs) = tests::require_program("debugfs", "apt-get install e2fsprogs") {
        for (sum, name) in &sums {
            let out = Command::new(&debugfs)
                .arg("-R")
                .arg(format!("cat /{name}"))
                .arg(&img)
                .output()
                .unwrap();
            assert_eq!(&md5_of(&out.stdout), sum, "{name} read on the host");
        }
    }
}

#[test]
fn a_readonly_disk_refuses_writes_in_the_guest() {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path());
    std::fs::write(&img, vec![0x5au8; DISK as usize]).unwrap();
    let b = backend(&img, &["--readonly"]);
    let run = boot(
        Qemu::new(),
        &b,
        r#"
echo "RO=$(cat /sys/block/vda/ro)"
if dd if=/dev/zero of=/dev/vda bs=4k count=1 conv=notrunc oflag=direct 2>/dev/null; then
  echo WRITE=succeeded
else
  echo WRITE=refused
fi
echo "FIRST=$(dd if=/dev/vda bs=1 count=1 2>/dev/null | od -An -tx1 | tr -d ' ')"
"#,
    );
    let out = run.script_output();
    assert_eq!(line_after(&out, "RO="), "1");
    assert_eq!(line_after(&out, "WRITE="), "refused");
    assert_eq!(line_after(&out, "FIRST="), "5a");
    drop(b);
    assert!(std::fs::read(&img).unwrap().iter().all(|&x| x == 0x5a));
}

#[test]
fn discard_and_write_zeroes_from_the_guest_punch_holes() {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    let Some(blkdiscard) = tests::require_program("blkdiscard", "apt-get install util-linux")
    else {
        return;
    };
    let Some(fallocate) = tests::require_program("fallocate", "apt-get install util-linux") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path());
    let b = backend(&img, &[]);
    // 128 MiB of data, then per 32 MiB: a discard (busybox blkdiscard); a
    // hole punched in the block device (util-linux fallocate -p: the block
    // layer sends WRITE_ZEROES with unmap); a zero-out (blkdiscard -z:
    // WRITE_ZEROES without unmap, so the space stays allocated); the rest
    // kept.
    let run = boot(
        Qemu::new()
            .tool(&blkdiscard)
            .unwrap()
            .tool(&fallocate)
            .unwrap(),
        &b,
        &format!(
            r#"
dd if=/dev/urandom of=/dev/vda bs=1M count=128 oflag=direct 2>/dev/null
sync
echo "KEPT=$(dd if=/dev/vda bs=1M skip=96 count=32 2>/dev/null | md5sum | cut -d' ' -f1)"
blkdiscard -o 0 -l 33554432 /dev/vda
{TOOL_RUN} /tools/fallocate -p -o 33554432 -l 33554432 /dev/vda
{TOOL_RUN} /tools/blkdiscard -z -o 67108864 -l 33554432 /dev/vda
sync
echo "ZEROED=$(dd if=/dev/vda bs=1M count=96 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
"#
        ),
    );
    let out = run.script_output();
    assert_eq!(run.exit_code, 0, "{out}");
    drop(b);
    let data = std::fs::read(&img).unwrap();
    let zeros = md5_of(&vec![0u8; 96 << 20]);
    assert_eq!(line_after(&out, "ZEROED="), zeros, "the guest reads zeros");
    assert!(
        data[..96 << 20].iter().all(|&x| x == 0),
        "the host reads zeros"
    );
    assert_eq!(
        line_after(&out, "KEPT="),
        md5_of(&data[96 << 20..128 << 20]),
        "the data after the holes is intact"
    );
    // 128 MiB were written; the discard and the punched hole gave 64 back.
    let allocated = std::fs::metadata(&img).unwrap().blocks() * 512;
    assert!(
        allocated <= 72 << 20,
        "{} MiB still allocated after freeing 64 of 128",
        allocated >> 20
    );
}

#[test]
fn concurrent_random_writers_are_all_on_disk() {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path());
    let b = backend(&img, &["--num-queues=2"]);
    // Four writers, each owning the 4 KiB blocks b with b % 4 == writer,
    // write numbered blocks in random order (with repeats) and log each.
    // The host then finds, in every block, the last write logged for it.
    let run = boot(
        Qemu::new().cpus(2),
        &b,
        r#"
for p in 0 1 2 3; do
  (
    i=0
    while [ $i -lt 60 ]; do
      blk=$(( (RANDOM % 64) * 4 + p ))
      printf "%-4096s" "p=$p blk=$blk seq=$i" | dd of=/dev/vda bs=4096 seek=$blk count=1 conv=notrunc oflag=direct 2>/dev/null
      echo "LOG $p $blk $i" >> /tmp/log.$p
      i=$((i + 1))
    done
  ) &
done
wait
sync
cat /tmp/log.0 /tmp/log.1 /tmp/log.2 /tmp/log.3
"#,
    );
    let out = run.script_output();
    assert_eq!(run.exit_code, 0, "{out}");
    drop(b);
    let mut last = std::collections::BTreeMap::new();
    let mut writes = 0;
    for l in out.lines().filter_map(|l| l.strip_prefix("LOG ")) {
        let v: Vec<u64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
        // Logs are in order per writer, and writers own disjoint blocks.
        last.insert(v[1], (v[0], v[2]));
        writes += 1;
    }
    assert_eq!(writes, 240, "{out}");
    let data = std::fs::read(&img).unwrap();
    for (blk, (p, seq)) in &last {
        let block = &data[*blk as usize * 4096..(*blk as usize + 1) * 4096];
        let want = format!("{:<4096}", format!("p={p} blk={blk} seq={seq}"));
        assert!(
            block == want.as_bytes(),
            "block {blk}: {:?}",
            String::from_utf8_lossy(&block[..40])
        );
    }
    // Blocks nobody wrote are still zero.
    for blk in 0..256u64 {
        if !last.contains_key(&blk) {
            let s = blk as usize * 4096;
            assert!(data[s..s + 4096].iter().all(|&x| x == 0), "block {blk}");
        }
    }
}

#[test]
fn a_resized_image_reaches_the_running_guest() {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path());
    let b = backend(&img, &["--resize-poll-ms=100"]);
    // Once the guest has marked the disk, grow the image under it.
    let grower = {
        let img = img.clone();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(240);
            while std::time::Instant::now() < deadline {
                let head = std::fs::read(&img)
                    .map(|d| d[..10].to_vec())
                    .unwrap_or_default();
                if head == b"GUESTREADY" {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&img)
                        .unwrap()
                        .set_len(2 * DISK)
                        .unwrap();
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        })
    };
    let run = boot(
        Qemu::new(),
        &b,
        r#"
before=$(cat /sys/block/vda/size)
echo "BEFORE=$before"
printf GUESTREADY | dd of=/dev/vda bs=512 count=1 conv=sync oflag=direct 2>/dev/null
i=0
while [ $i -lt 300 ] && [ "$(cat /sys/block/vda/size)" = "$before" ]; do sleep 0.1; i=$((i+1)); done
echo "AFTER=$(cat /sys/block/vda/size)"
"#,
    );
    let out = run.script_output();
    assert!(
        grower.join().unwrap(),
        "the guest never marked the disk:\n{out}"
    );
    assert_eq!(line_after(&out, "BEFORE="), (DISK / 512).to_string());
    assert_eq!(
        line_after(&out, "AFTER="),
        (2 * DISK / 512).to_string(),
        "{out}\n--- blk-backend ---\n{}",
        b.output()
    );
}
