//! A real Linux guest under QEMU reads host files through virtiofsd (the reference backend).

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use tests::guest::{self, peers, Qemu};

/// TCG boots in ~4 s here; the rest is headroom for a loaded 2-core machine.
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn host_md5(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("md5sum")
        .arg(path)
        .output()
        .context("running md5sum on the host")?;
    let text = String::from_utf8(out.stdout)?;
    Ok(text
        .split_whitespace()
        .next()
        .context("md5sum printed nothing")?
        .to_owned())
}

#[test]
fn guest_reads_host_files_through_virtiofsd() -> anyhow::Result<()> {
    if tests::require(guest::qemu_available()).is_none() {
        return Ok(());
    }
    let Some(virtiofsd) = tests::require_program("virtiofsd", "cargo install virtiofsd --locked")
    else {
        return Ok(());
    };

    let work = tempfile::tempdir()?;
    let share = work.path().join("share");
    std::fs::create_dir(&share)?;
    let token = random_hex(16)?;
    std::fs::write(share.join("token.txt"), format!("{token}\n"))?;
    let mut blob = vec![0u8; 1 << 20];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut blob)?;
    std::fs::write(share.join("blob.bin"), &blob)?;
    let md5 = host_md5(&share.join("blob.bin"))?;

    let mut daemon = peers::virtiofsd(&virtiofsd, &share)?;
    let script = "set -e
mkdir -p /mnt/host
mount -t virtiofs share /mnt/host
cat /mnt/host/token.txt
md5sum /mnt/host/blob.bin
";
    let run = match Qemu::new()
        .fs(daemon.socket(), "share")
        .run(script, GUEST_TIMEOUT)
    {
        Ok(run) => run,
        Err(e) => bail!(
            "{:#}\n--- virtiofsd output ---\n{}",
            anyhow::Error::from(e),
            daemon.output()
        ),
    };
    daemon.kill();
    eprintln!("guest ran in {:.1?}", run.elapsed);

    let out = run.script_output();
    let context = || format!("guest output:\n{out}\n--- console ---\n{}", run.serial);
    assert!(
        out.lines().any(|l| l.trim() == token),
        "token missing; {}",
        context()
    );
    assert!(
        out.contains(&format!("{md5}  /mnt/host/blob.bin")),
        "checksum {md5} missing; {}",
        context()
    );
    assert_eq!(run.exit_code, 0, "{}", context());
    Ok(())
}

#[test]
fn guest_exit_code_reaches_the_host() -> anyhow::Result<()> {
    if tests::require(guest::qemu_available()).is_none() {
        return Ok(());
    }
    let run = Qemu::new().run("echo from-the-guest\nexit 7\n", GUEST_TIMEOUT)?;
    assert_eq!(
        run.script_lines(),
        ["from-the-guest"],
        "console:\n{}",
        run.serial
    );
    assert_eq!(run.exit_code, 7);
    Ok(())
}
