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
