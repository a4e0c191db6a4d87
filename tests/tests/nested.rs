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
