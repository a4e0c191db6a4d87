//! vmm-core running real Linux guests in the nested AMD-V bed.

use std::time::Duration;

use tests::nested::{inner_console, Bed};

fn bed(programs: &[&str], inner_script: &str) -> Option<Bed> {
    tests::require(Bed::new(programs, inner_script))
}

#[test]
fn vmm_core_boots_debians_kernel_to_a_command_and_back() {
    let Some(bed) = bed(&["vmm-core"], "echo hello-from-the-inner-guest; exit 7") else {
        return;
    };
    let run = bed
        .run(
            "inner; echo VMM_RC=$(cat /tmp/vmm.rc); dmesg | grep -i -E 'kvm|svm' | sed 's/^/outer-dmesg: /'",
            Duration::from_secs(600),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let inner = inner_console(&run);
    let all = &run.serial;
    // What the inner guest's programs write reaches the console (the
    // UART's transmit interrupt works), and its script's exit code is
    // reported as the test bed's protocol has it.
    assert!(inner.contains("hello-from-the-inner-guest"), "{all}");
    assert!(inner.contains("TESTBED.INNER-EXIT=7"), "{all}");
    // vmm-core itself ends cleanly once the guest powers off.
    assert!(all.contains("VMM_RC=0"), "{all}");
    // Both vCPUs came up.
    assert!(inner.contains("Total of 2 processors activated"), "{all}");
    // No probe of hardware vmm-core does not have holds the boot up: no
    // RTC is probed (the FADT says there is none).
    assert!(!inner.contains("rtc_cmos"), "{all}");
    eprintln!("{all}");
}

/// The inner guest's side of the device test: reads the share, writes
/// back, and makes an ext4 filesystem on the disk on its first boot,
/// which it checks on its second.
const DEVICES_INNER: &str = r#"
echo "SHARE-READ=$(cat /mnt/host/hello.txt)"
echo "from-the-inner-guest" > /mnt/host/back.txt && sync && echo SHARE-WROTE
mkdir -p /mnt/d
if mount -t ext4 /dev/vda /mnt/d 2>/dev/null && [ -f /mnt/d/SUMS ]; then
    cd /mnt/d && md5sum -c SUMS && echo SECOND-BOOT-OK; cd /; umount /mnt/d
else
    mke2fs -q -F /dev/vda && mount -t ext4 /dev/vda /mnt/d || exit 3
    dd if=/dev/urandom of=/mnt/d/f bs=64k count=32 2>/dev/null
    (cd /mnt/d && md5sum f > SUMS) && cp /mnt/d/SUMS /mnt/host/SUMS
    sync; umount /mnt/d && echo FIRST-BOOT-OK
fi
"#;

/// The backends run in the outer guest, sandboxed as usual; vmm-core
/// boots the inner guest twice on them.
#[test]
fn a_share_and_a_disk_served_by_the_backends_work_end_to_end_under_vmm_core() {
    let Some(bed) = bed(
        &["vmm-core", "virtiofsd-fast", "blk-backend"],
        DEVICES_INNER,
    ) else {
        return;
    };
    let script = r#"
mkdir -p /srv/share && echo from-the-outer-side > /srv/share/hello.txt
dd if=/dev/zero of=/srv/disk.img bs=1M count=0 seek=64 2>/dev/null
virtiofsd-fast --socket-path=/tmp/fs.sock --shared-dir=/srv/share --tag=host > /tmp/fs.log 2>&1 &
blk-backend --socket-path=/tmp/blk.sock --image=/srv/disk.img > /tmp/blk.log 2>&1 &
while [ ! -S /tmp/fs.sock ] || [ ! -S /tmp/blk.sock ]; do sleep 0.1; done
for boot in 1 2; do
    inner --fs socket=/tmp/fs.sock,tag=host --blk socket=/tmp/blk.sock \
        --cmdline "console=ttyS0 reboot=k panic=1 testbed.fs=host:/mnt/host"
    echo "BOOT$boot-RC=$(cat /tmp/vmm.rc)"
done
echo "OUTER-SEES=$(cat /srv/share/back.txt)"
echo "OUTER-SUMS=$(cat /srv/share/SUMS)"
sed 's/^/fs-log: /' /tmp/fs.log | tail -5; sed 's/^/blk-log: /' /tmp/blk.log | tail -5
"#;
    let run = bed
        .run(script, Duration::from_secs(900))
        .unwrap_or_else(|e| panic!("{e}"));
    let all = &run.serial;
    let inner = inner_console(&run);
    for want in [
        "SHARE-READ=from-the-outer-side",
        "SHARE-WROTE",
        "FIRST-BOOT-OK",
        "SECOND-BOOT-OK",
        "f: OK",
    ] {
        assert!(inner.contains(want), "{want} missing:\n{all}");
    }
    for want in [
        "BOOT1-RC=0",
        "BOOT2-RC=0",
        "OUTER-SEES=from-the-inner-guest",
    ] {
        assert!(all.contains(want), "{want} missing:\n{all}");
    }
    assert!(all.contains("OUTER-SUMS=") && all.contains("  f"), "{all}");
}

/// The inner guest's side of the network test: 2 MiB each way over HTTP
/// (busybox wget and httpd on both sides), checksummed on both sides. It
/// serves its upload until the outer side says it has it.
const NET_INNER: &str = r#"
wget -q -O /tmp/down http://10.9.0.1:8000/down && echo "DOWN-SUM=$(md5sum < /tmp/down | cut -c1-32)"
mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/up bs=64k count=32 2>/dev/null
echo "UP-SUM=$(md5sum < /tmp/www/up | cut -c1-32)"
httpd -p 8001 -h /tmp/www
i=0; until wget -q -O /dev/null http://10.9.0.1:8000/done; do
    i=$((i + 1)); [ $i -gt 600 ] && break; sleep 0.2
done
"#;

/// net-backend in the outer guest on a tap there; vmm-core's inner guest
/// moves data both ways over it.
#[test]
fn a_nic_served_by_net_backend_moves_data_both_ways_under_vmm_core() {
    let Some(bed) = bed(&["vmm-core", "net-backend"], NET_INNER) else {
        return;
    };
    let script = r#"
net-backend --socket-path=/tmp/net.sock --tap=tap0 > /tmp/net.log 2>&1 &
while [ ! -S /tmp/net.sock ]; do sleep 0.1; done
ip addr add 10.9.0.1/24 dev tap0 && ip link set tap0 up
mkdir -p /srv/www
dd if=/dev/urandom of=/srv/www/down bs=64k count=32 2>/dev/null
echo "OUTER-DOWN-SUM=$(md5sum < /srv/www/down | cut -c1-32)"
httpd -p 8000 -h /srv/www
inner --net socket=/tmp/net.sock --cmdline "console=ttyS0 reboot=k panic=1 testbed.ip=10.9.0.2/24" &
guest=$!
# busybox's wget crashes under TCG's -cpu max here: fetch with nc, and
# keep the body (the last 2 MiB of the answer).
i=0; until printf 'GET /up HTTP/1.0\r\n\r\n' | nc -w 10 10.9.0.2 8001 > /tmp/answer \
        && [ "$(wc -c < /tmp/answer)" -gt 2097152 ]; do
    i=$((i + 1)); [ $i -gt 300 ] && break; sleep 0.5
done
tail -c 2097152 /tmp/answer > /tmp/up
touch /srv/www/done
wait $guest
echo "RC=$(cat /tmp/vmm.rc)"
echo "OUTER-UP-SUM=$(md5sum < /tmp/up | cut -c1-32)"
tail -5 /tmp/net.log
"#;
    let run = bed
        .run(script, Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("{e}"));
    let all = &run.serial;
    let sum = |key: &str| -> String {
        all.lines()
            .find_map(|l| l.split_once(key).map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {key}:\n{all}"))
    };
    assert!(all.contains("RC=0"), "{all}");
    assert_eq!(sum("OUTER-UP-SUM="), sum("inner| UP-SUM="), "guest to host");
    assert_eq!(
        sum("OUTER-DOWN-SUM="),
        sum("inner| DOWN-SUM="),
        "host to guest"
    );
}

/// `orchestrator run` on a machine with AMD-V (the outer guest): `vmm =
/// "auto"` picks vmm-core and says why, the share and disk backends start
/// sandboxed, the command's output streams back and its exit code becomes
/// the orchestrator's.
#[test]
fn orchestrator_run_picks_vmm_core_on_amd_v_and_passes_output_and_exit_code() {
    let Some(bed) = bed(
        &["orchestrator", "vmm-core", "virtiofsd-fast", "blk-backend"],
        "true",
    ) else {
        return;
    };
    let Some(bed) = tests::require(bed.with_image_inputs()) else {
        return;
    };
    let script = r#"
mkdir -p /srv/proj && cd /srv/proj && echo in-the-project > hello.txt
dd if=/dev/zero of=/srv/disk.img bs=1M count=0 seek=32 2>/dev/null
cat > vm.toml <<EOT
[vm]
name = "nested"
cpus = 2
memory = "256M"
vmm = "auto"
[[fs]]
shared_dir = "/srv/proj"
tag = "host"
[[blk]]
image = "/srv/disk.img"
EOT
orchestrator run -f vm.toml -- 'cat /mnt/host/hello.txt; echo made-in-guest > /mnt/host/out.txt; ls /sys/block; exit 7'
echo "ORCH-RC=$?"
echo "HOST-SEES=$(cat /srv/proj/out.txt)"
"#;
    let run = bed
        .run(script, Duration::from_secs(900))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = run.script_output();
    for want in [
        "vmm: vmm-core (auto: this CPU has hardware virtualization",
        "in-the-project",
        "vda",
        "ORCH-RC=7",
        "HOST-SEES=made-in-guest",
    ] {
        assert!(out.contains(want), "{want} missing:\n{}", run.serial);
    }
}

/// The orchestrator's lifecycle commands on a vmm-core VM in the bed: `up
/// -d` returns with the VM running, `status` shows the VMM's own state and
/// every device, the console reaches the guest's shell, `restart` and a
/// `kill -9` of the share's backend leave the guest's mount working, `logs`
/// shows a device's log, and `down` stops everything.
#[test]
fn up_status_console_restart_kill_logs_and_down_work_on_a_vmm_core_vm() {
    let Some(bed) = bed(
        &["orchestrator", "vmm-core", "virtiofsd-fast", "blk-backend"],
        "true",
    ) else {
        return;
    };
    let Some(bed) = tests::require(bed.with_image_inputs()) else {
        return;
    };
    let script = r#"
mkdir -p /srv/proj && cd /srv/proj && echo in-the-project > hello.txt
dd if=/dev/zero of=/srv/disk.img bs=1M count=0 seek=32 2>/dev/null
printf '[vm]\nname = "bg"\ncpus = 2\nmemory = "256M"\nvmm = "core"\n[[fs]]\nshared_dir = "/srv/proj"\ntag = "host"\n[[blk]]\nimage = "/srv/disk.img"\n' > vm.toml
orchestrator up -d -f vm.toml; echo "UP-RC=$?"
orchestrator status --name bg | sed 's/^/STATUS1| /'
# The console: the guest's shell writes a file through the share.
say() {
    ( sleep 1; echo "$1"; sleep 2 ) | orchestrator console --name bg > /dev/null 2>&1
}
wait_file() {
    i=0; while [ ! -s "$1" ] && [ $i -lt 90 ]; do say "$2"; sleep 1; i=$((i + 1)); done
}
wait_file /srv/proj/c1 'echo console-$(cat /mnt/host/hello.txt) > /mnt/host/c1'
echo "CONSOLE1=$(cat /srv/proj/c1)"
orchestrator restart blk0 --name bg; echo "RESTART-RC=$?"
fs0=$(orchestrator status --name bg | awk '$1 == "fs0" { print $2 }')
kill -9 "$fs0"
i=0; while [ "$(orchestrator status --name bg | awk '$1 == "fs0" { print $4 }')" != 1 ] && [ $i -lt 100 ]; do
    sleep 0.2; i=$((i + 1)); done
wait_file /srv/proj/c2 'echo after-kill-$(cat /mnt/host/hello.txt) > /mnt/host/c2'
echo "CONSOLE2=$(cat /srv/proj/c2)"
orchestrator status --name bg | sed 's/^/STATUS2| /'
orchestrator logs fs0 --name bg | tail -3 | sed 's/^/LOG| /'
orchestrator down --name bg; echo "DOWN-RC=$?"
sleep 1
echo "LEFT=$(pidof vmm-core virtiofsd-fast blk-backend orchestrator | wc -w)"
"#;
    let run = bed
        .run(script, Duration::from_secs(900))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = run.script_output();
    let all = &run.serial;
    // Keys typed before the guest's shell was up may come before the
    // command on its line: look for what the command wrote.
    for want in [
        "UP-RC=0",
        "console-in-the-project",
        "RESTART-RC=0",
        "after-kill-in-the-project",
        "DOWN-RC=0",
        "LEFT=0",
    ] {
        assert!(out.contains(want), "{want} missing:\n{all}");
    }
    let status1: Vec<&str> = out.lines().filter(|l| l.starts_with("STATUS1|")).collect();
    assert!(
        status1
            .iter()
            .any(|l| l.contains("VMM:") && l.contains("running")),
        "{status1:?}"
    );
    let status2: Vec<&str> = out.lines().filter(|l| l.starts_with("STATUS2|")).collect();
    for dev in ["fs0", "blk0"] {
        let row = status2
            .iter()
            .find(|l| l.split_whitespace().nth(1) == Some(dev))
            .unwrap_or_else(|| panic!("no {dev} row: {status2:?}"));
        assert_eq!(row.split_whitespace().nth(4), Some("1"), "{dev}: {row}");
        assert!(row.contains("running"), "{row}");
    }
    assert!(out.contains("LOG| "), "{all}");
}

/// Backends killed again and again under guest I/O on a vmm-core VM:
/// vmm-core reconnects each restarted backend, the guest never stops, and
/// every write it saw acknowledged is there afterwards (checked from the
/// outer side). Prints the time from each kill to the guest's next round.
#[test]
fn backends_killed_under_guest_io_lose_nothing_under_vmm_core() {
    let Some(bed) = bed(
        &["orchestrator", "vmm-core", "virtiofsd-fast", "blk-backend"],
        "true",
    ) else {
        return;
    };
    let Some(bed) = tests::require(bed.with_image_inputs()) else {
        return;
    };
    // The guest: each round writes a file through the share (renamed into
    // place after an fsync) and a 4 KiB O_DIRECT block to the disk,
    // acknowledging each in the share once done; it stops when told.
    let guest = "cd /mnt/host; i=0; while [ ! -e stop ]; do i=$((i + 1)); \
        echo data-$i > t.$i && sync t.$i && mv t.$i f.$i || echo ERR=share$i; \
        dd if=/dev/urandom of=/tmp/b bs=4k count=1 2>/dev/null; \
        if dd if=/tmp/b of=/dev/vda bs=4k seek=$i oflag=direct conv=notrunc 2>/dev/null; then \
          echo \"$i $(md5sum < /tmp/b | cut -c1-32)\" >> acks; else echo ERR=disk$i; fi; \
        echo $i > round; done; echo DONE=$i";
    let script = format!(
        r#"
mkdir -p /srv/proj && cd /srv/proj
dd if=/dev/zero of=/srv/disk.img bs=1M count=0 seek=16 2>/dev/null
printf '[vm]\nname = "soak"\ncpus = 2\nmemory = "256M"\nvmm = "core"\n[[fs]]\nshared_dir = "/srv/proj"\ntag = "host"\n[[blk]]\nimage = "/srv/disk.img"\n' > vm.toml
orchestrator run -f vm.toml -- '{guest}' > /tmp/run.out 2>&1 &
round() {{ cat /srv/proj/round 2>/dev/null || echo 0; }}
up() {{ cut -d' ' -f1 /proc/uptime; }}
i=0; while [ "$(round)" -lt 2 ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i + 1)); done
for kill in 1 2 3 4 5 6; do
    case $kill in 1|3|5) dev=fs0 ;; *) dev=blk0 ;; esac
    sleep 1.5
    pid=$(orchestrator status --name soak | awk -v d=$dev '$1 == d {{ print $2 }}')
    at=$(round); t0=$(up)
    kill -9 "$pid"
    i=0; while [ "$(round)" -le "$at" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i + 1)); done
    echo "STALL $dev $(awk -v a=$t0 -v b=$(up) 'BEGIN {{ printf "%d", (b - a) * 1000 }}') ms"
done
touch /srv/proj/stop
wait
sed 's/^/RUN| /' /tmp/run.out | grep -v 'RUN| \[' | tail -8
n=0; bad=0
while read i sum; do
    got=$(dd if=/srv/disk.img bs=4k skip=$i count=1 2>/dev/null | md5sum | cut -c1-32)
    [ "$got" = "$sum" ] || {{ bad=$((bad + 1)); echo "LOST block $i"; }}
    n=$((n + 1))
done < /srv/proj/acks
echo "ACKS=$n BAD=$bad ROUNDS=$(round)"
ls /srv/proj | grep -c '^f\.' | sed 's/^/FILES=/'
"#
    );
    let run = bed
        .run(&script, Duration::from_secs(900))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = run.script_output();
    let all = &run.serial;
    let val = |key: &str| -> u64 {
        out.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}:\n{all}"))
    };
    assert!(!out.contains("ERR="), "{all}");
    assert!(out.contains("DONE="), "the guest did not finish:\n{all}");
    let (acks, bad, rounds) = (val("ACKS="), val("BAD="), val("ROUNDS="));
    assert_eq!(bad, 0, "{all}");
    assert!(acks >= rounds && rounds > 6, "{all}");
    assert!(val("FILES=") >= rounds, "{all}");
    for l in out.lines().filter(|l| l.starts_with("STALL")) {
        eprintln!("vmm-core in the nested bed: {l}");
    }
}

/// A guest that writes garbage to every I/O port vmm-core might see and
/// reads them all back: vmm-core ignores what it does not emulate, and the
/// guest carries on to the end of its script. Left out: the ports that end
/// the VM when asked (i8042 reset, debug exit, ACPI), the console's UART,
/// and KVM's own PIC, PIT and ELCR, whose garbage would wreck the guest's
/// own timer and interrupts rather than test vmm-core.
#[test]
fn a_guest_writing_garbage_to_every_port_carries_on() {
    let inner = r#"
for r in 0:32 34:64 68:97 98:100 101:160 162:1016 1024:1232 1234:1281 1282:1536 1540:65536; do
    s=${r%:*}; e=${r#*:}
    dd if=/dev/urandom of=/dev/port bs=1 seek=$s count=$((e - s)) 2>/dev/null
    dd if=/dev/port of=/dev/null bs=1 skip=$s count=$((e - s)) 2>/dev/null
done
echo STILL-HERE
"#;
    let Some(bed) = bed(&["vmm-core"], inner) else {
        return;
    };
    let run = bed
        .run(
            "inner; echo VMM_RC=$(cat /tmp/vmm.rc)",
            Duration::from_secs(900),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let inner = inner_console(&run);
    assert!(inner.contains("STILL-HERE"), "{}", run.serial);
    assert!(inner.contains("TESTBED.INNER-EXIT=0"), "{}", run.serial);
    assert!(run.serial.contains("VMM_RC=0"), "{}", run.serial);
}
