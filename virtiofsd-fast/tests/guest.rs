//! A real Linux guest under QEMU uses a share served by virtiofsd-fast:
//! the everyday file operations, checked on both sides, and coherence with
//! changes made on the host while the guest is running.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::frontend::BackendProcess;
use tests::guest::{self, GuestRun, Qemu};

/// TCG boots in ~5 s here; the rest is headroom for a loaded 2-core machine.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

fn daemon(share: &Path, extra: &[&str]) -> BackendProcess {
    let mut argv = vec![
        env!("CARGO_BIN_EXE_virtiofsd-fast").to_string(),
        "--fd={fd}".into(),
        format!("--shared-dir={}", share.display()),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    BackendProcess::spawn(&argv, Duration::from_secs(10)).expect("virtiofsd-fast starts")
}

fn boot(d: &BackendProcess, script: &str) -> GuestRun {
    boot_with(d, script, Qemu::new())
}

fn boot_with(d: &BackendProcess, script: &str, qemu: Qemu) -> GuestRun {
    let full = format!(
        "set -e\nmkdir -p /mnt/host\nmount -t virtiofs share /mnt/host\ncd /mnt/host\n{script}"
    );
    match qemu.fs(d.socket(), "share").run(&full, GUEST_TIMEOUT) {
        Ok(run) => run,
        Err(e) => panic!("{e}\n--- virtiofsd-fast ---\n{}", d.output()),
    }
}

fn md5(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The daemon's "requests served" line, logged once the guest has gone.
fn requests_served(d: &BackendProcess) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = d.output();
        if let Some(l) = out.lines().find(|l| l.contains("requests served")) {
            return l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no request counts logged:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How many requests of `opcode` the line counts.
fn served_count(line: &str, opcode: &str) -> u64 {
    line.split([' ', '"'])
        .find_map(|w| w.strip_prefix(opcode)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(0)
}

fn line_after<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no `{key}` line in:\n{out}"))
        .trim()
}

#[test]
fn everyday_file_operations() {
    everyday_file_operations_with(&[]);
}

#[test]
fn everyday_file_operations_with_cache_always() {
    // Listings cached for good and no OPENDIR at all: the paths a walk takes
    // are different, the results must not be.
    everyday_file_operations_with(&["--cache=always"]);
}

#[test]
fn everyday_file_operations_with_a_thread_pool() {
    // Requests served on pool threads, finishing out of order.
    everyday_file_operations_with(&["--thread-pool-size=4"]);
}

fn everyday_file_operations_with(flags: &[&str]) {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let blob: Vec<u8> = (0..(3u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(dir.path().join("host.bin"), &blob).unwrap();
    let d = daemon(dir.path(), flags);
    // coreutils' cp copies with copy_file_range(2) (busybox's reads and
    // writes), so the copy below exercises FUSE_COPY_FILE_RANGE.
    let qemu = Qemu::new()
        .tool(Path::new("/bin/cp"))
        .expect("coreutils cp into the guest");
    let script = r#"
echo "host-md5: $(md5sum host.bin | cut -d' ' -f1)"
TOOL_RUN /tools/cp host.bin copied.bin
echo "copied-md5: $(md5sum copied.bin | cut -d' ' -f1)"
"#
    .replace("TOOL_RUN", guest::TOOL_RUN);
    let run = boot_with(
        &d,
        &(script
            + r#"
echo small > g-small.txt
dd if=/dev/urandom of=g-big.bin bs=1M count=8 2>/dev/null
echo "guest-md5: $(md5sum g-big.bin | cut -d' ' -f1)"
echo one > r1; echo two > r2; mv r1 r2
echo "rename-over: $(cat r2) $([ -e r1 ] && echo r1-left || echo r1-gone)"
echo h > h1; ln h1 h2
echo "links: $(stat -c %h h1)"
ln -s h1 s1
echo "symlink: $(readlink s1) $(cat s1)"
chmod 640 h1
echo "mode: $(stat -c %a h1)"
echo 0123456789 > t; truncate -s 4 t
echo "truncated: $(cat t) $(stat -c %s t)"
exec 3< h2
rm h1 h2
echo "open-unlinked: $(cat <&3)"
exec 3<&-
mkdir many
i=0; while [ $i -lt 3000 ]; do : > many/f$i; i=$((i+1)); done
echo "created: $(ls many | wc -l)"
mkdir -p tree/a/b/c; echo x > tree/a/b/c/f; ln -s ../.. tree/a/b/up
rm -rf many tree
echo "removed: $([ -e many ] || [ -e tree ] && echo no || echo yes)"
mkdir -m 777 userdir
mkdir -p /etc
printf 'root:x:0:0::/root:/bin/sh\ntester:x:1000:1000::/tmp:/bin/sh\n' > /etc/passwd
printf 'root:x:0:\ntester:x:1000:\n' > /etc/group
su tester -c 'mkdir userdir/d && echo x > userdir/f && ln -s f userdir/l && mkfifo userdir/p'
echo "as-user: $(stat -c %u:%g userdir/d) $(stat -c %u:%g userdir/f) $(stat -c %u:%g userdir/l) $(stat -c %u:%g userdir/p)"
sync
"#),
        qemu,
    );
    let out = run.script_output();
    assert_eq!(
        run.exit_code,
        0,
        "{out}\n--- console ---\n{}\n--- daemon ---\n{}",
        run.serial,
        d.output()
    );
    assert_eq!(
        line_after(&out, "host-md5:"),
        md5(&dir.path().join("host.bin"))
    );
    // Copied on the host, read back by the guest and by the host.
    assert_eq!(
        line_after(&out, "copied-md5:"),
        line_after(&out, "host-md5:")
    );
    assert_eq!(
        std::fs::read(dir.path().join("copied.bin")).unwrap(),
        blob,
        "the copy on the host"
    );
    let served = requests_served(&d);
    assert!(served_count(&served, "COPY_FILE_RANGE") >= 1, "{served}");
    // The guest's `sync` reached the daemon (as syncfs on the share).
    assert!(served_count(&served, "SYNCFS") >= 1, "{served}");
    assert_eq!(
        line_after(&out, "guest-md5:"),
        md5(&dir.path().join("g-big.bin"))
    );
    assert_eq!(
        std::fs::metadata(dir.path().join("g-big.bin"))
            .unwrap()
            .len(),
        8 << 20
    );
    assert_eq!(
        std::fs::read(dir.path().join("g-small.txt")).unwrap(),
        b"small\n"
    );
    assert_eq!(line_after(&out, "rename-over:"), "one r1-gone");
    assert_eq!(line_after(&out, "links:"), "2");
    assert_eq!(line_after(&out, "symlink:"), "h1 h");
    assert_eq!(line_after(&out, "mode:"), "640");
    assert_eq!(line_after(&out, "truncated:"), "0123 4");
    assert_eq!(line_after(&out, "open-unlinked:"), "h");
    assert_eq!(line_after(&out, "created:"), "3000");
    assert_eq!(line_after(&out, "removed:"), "yes");
    // What a non-root guest user creates is theirs, on both sides.
    assert_eq!(
        line_after(&out, "as-user:"),
        "1000:1000 1000:1000 1000:1000 1000:1000"
    );
    for name in ["d", "f", "l", "p"] {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(dir.path().join("userdir").join(name)).unwrap();
        assert_eq!((m.uid(), m.gid()), (1000, 1000), "host owner of {name}");
    }
    assert!(!dir.path().join("many").exists() && !dir.path().join("h1").exists());
    assert_eq!(
        std::fs::read_link(dir.path().join("s1")).unwrap(),
        Path::new("h1")
    );
}

/// Run `change` on a host thread once the guest creates `ready` in the
/// share, then create `changed` so the guest knows; gives up with the guest.
fn when_guest_ready(
    dir: &Path,
    change: impl FnOnce(&Path) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let start = Instant::now();
        while !dir.join("ready").exists() {
            if start.elapsed() > GUEST_TIMEOUT {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        change(&dir);
        std::fs::write(dir.join("changed"), b"").unwrap();
    })
}

/// Guest script lines: tell the host the guest is ready, wait for its
/// change, then test the shell condition `check` every 50 ms for up to 5 s
/// and print "seen: yes|no" and "after-cs: N", the centiseconds it took.
fn await_host_change(check: &str) -> String {
    format!(
        r#"
: > ready
n=0; while [ ! -e changed ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n+1)); done
t0=$(cut -d' ' -f1 /proc/uptime)
seen=no; n=0
while [ $n -lt 100 ]; do
  if {check}; then seen=yes; break; fi
  sleep 0.05; n=$((n+1))
done
t1=$(cut -d' ' -f1 /proc/uptime)
echo "seen: $seen"
echo "after-cs: $(( ${{t1%.*}}${{t1#*.}} - ${{t0%.*}}${{t0#*.}} ))"
"#
    )
}

/// The guest reads `data.txt`, tells the host (through the share) it has,
/// the host rewrites it in place, and the guest reports how long the new
/// content took to show. Returns what the guest printed.
fn rewrite_seen_by_guest(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.txt");
    std::fs::write(&data, b"version-1\n").unwrap();
    let d = daemon(dir.path(), extra);
    let host = when_guest_ready(dir.path(), |dir| {
        // In place: same inode, same size, new mtime.
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("data.txt"))
            .unwrap();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.write_all(b"version-2\n").unwrap();
        f.sync_all().unwrap();
    });
    let script = format!(
        "echo \"first: $(cat data.txt)\"\n{}",
        await_host_change(r#"[ "$(cat data.txt)" = version-2 ]"#)
    );
    let run = boot(&d, &script);
    host.join().unwrap();
    let out = run.script_output();
    assert_eq!(run.exit_code, 0, "{out}\n{}", run.serial);
    assert_eq!(line_after(&out, "first:"), "version-1");
    out
}

#[test]
fn host_rewrite_shows_within_the_coherence_window() {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    let out = rewrite_seen_by_guest(&[]);
    assert_eq!(line_after(&out, "seen:"), "yes", "{out}");
    let cs: u64 = line_after(&out, "after-cs:").parse().unwrap();
    // The window is 1 s; allow the guest's polling and TCG's slowness.
    assert!(cs <= 250, "took {cs} centiseconds to show:\n{out}");
    eprintln!("host rewrite seen by the guest after {cs} cs");
}

#[test]
fn cache_always_keeps_the_stale_copy_as_virtiofsd_does() {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    // The control: without the coherence window the guest keeps what it read.
    let out = rewrite_seen_by_guest(&["--cache=always"]);
    assert_eq!(line_after(&out, "seen:"), "no", "{out}");
}

#[test]
fn host_create_delete_rename_chmod_show_within_the_window() {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("doomed"), b"x").unwrap();
    std::fs::write(dir.path().join("old-name"), b"y").unwrap();
    std::fs::write(dir.path().join("perm"), b"z").unwrap();
    let d = daemon(dir.path(), &[]);
    let host = when_guest_ready(dir.path(), |dir| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(dir.join("born"), b"new").unwrap();
        std::fs::remove_file(dir.join("doomed")).unwrap();
        std::fs::rename(dir.join("old-name"), dir.join("new-name")).unwrap();
        std::fs::set_permissions(dir.join("perm"), std::fs::Permissions::from_mode(0o600)).unwrap();
    });
    // The guest looks at everything first, so each answer is cached.
    let script = format!(
        r#"
ls > /dev/null; cat doomed old-name perm > /dev/null; stat -c %a perm > /dev/null
[ -e born ] || echo "before: born absent"
{}
echo "born: $([ -e born ] && cat born)"
echo "doomed: $([ -e doomed ] && echo present || echo gone)"
echo "renamed: $([ -e new-name ] && cat new-name) $([ -e old-name ] && echo old-left || echo old-gone)"
echo "mode: $(stat -c %a perm)"
"#,
        await_host_change(
            r#"[ -e born ] && [ ! -e doomed ] && [ -e new-name ] && [ ! -e old-name ] && [ "$(stat -c %a perm)" = 600 ]"#
        )
    );
    let run = boot(&d, &script);
    host.join().unwrap();
    let out = run.script_output();
    assert_eq!(run.exit_code, 0, "{out}\n{}", run.serial);
    assert_eq!(line_after(&out, "before:"), "born absent");
    assert_eq!(line_after(&out, "born:"), "new");
    assert_eq!(line_after(&out, "doomed:"), "gone");
    assert_eq!(line_after(&out, "renamed:"), "y old-gone");
    assert_eq!(line_after(&out, "mode:"), "600");
    let cs: u64 = line_after(&out, "after-cs:").parse().unwrap();
    assert!(cs <= 250, "took {cs} centiseconds to show:\n{out}");
}

/// The guest lists a directory again and again, and keeps its cached
/// listing from one pass to the next while the entries that pass refreshed
/// are fresh; entries the host makes, removes and renames there still show
/// in the listing within the window.
#[test]
fn host_changes_show_in_a_listing_the_guest_keeps() {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    for name in ["doomed", "keep", "old-name"] {
        std::fs::write(sub.join(name), name).unwrap();
    }
    let d = daemon(dir.path(), &[]);
    let host = when_guest_ready(dir.path(), |dir| {
        let sub = dir.join("sub");
        std::fs::write(sub.join("born"), b"new").unwrap();
        std::fs::remove_file(sub.join("doomed")).unwrap();
        std::fs::rename(sub.join("old-name"), sub.join("new-name")).unwrap();
    });
    let script = format!(
        r#"
n=0; while [ $n -lt 20 ]; do echo "before: $(ls sub | tr '\n' ' ')"; sleep 0.05; n=$((n+1)); done
{}
echo "after: $(ls sub | tr '\n' ' ')"
"#,
        await_host_change(r#"[ "$(ls sub | tr '\n' ' ')" = "born keep new-name " ]"#)
    );
    let run = boot(&d, &script);
    host.join().unwrap();
    let out = run.script_output();
    assert_eq!(run.exit_code, 0, "{out}\n{}", run.serial);
    assert!(
        out.lines()
            .filter(|l| l.starts_with("before:"))
            .all(|l| l == "before: doomed keep old-name "),
        "{out}"
    );
    assert_eq!(line_after(&out, "after:"), "born keep new-name");
    let cs: u64 = line_after(&out, "after-cs:").parse().unwrap();
    assert!(cs <= 250, "took {cs} centiseconds to show:\n{out}");
    // Each uncached pass is two READDIRPLUS (the entries, then the empty
    // reply that ends it): the twenty passes before the change would be
    // forty. Kept listings make most of them free.
    let served = requests_served(&d);
    let plus = served_count(&served, "READDIRPLUS");
    assert!(plus < 20, "{plus} READDIRPLUS for 20+ listings: {served}");
    eprintln!("{plus} READDIRPLUS, change seen after {cs} cs");
}

/// With --announce-submounts a filesystem mounted inside the share is a
/// mount of its own in the guest: its own device number, its files served.
#[test]
fn a_mount_inside_the_share_is_a_submount_in_the_guest() {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("mnt");
    let Some(_tmpfs) = tests::fs::TmpfsMount::new(&sub) else {
        return;
    };
    std::fs::write(sub.join("inside"), b"on the tmpfs\n").unwrap();
    let d = daemon(dir.path(), &["--announce-submounts"]);
    let run = boot(
        &d,
        r#"
echo "inside: $(cat mnt/inside)"
echo "devs: $(stat -c %d /mnt/host) $(stat -c %d /mnt/host/mnt/inside)"
echo "mounted: $(grep -c ' /mnt/host/mnt ' /proc/mounts)"
"#,
    );
    let out = run.script_output();
    assert_eq!(run.exit_code, 0, "{out}\n{}", d.output());
    let devs: Vec<&str> = line_after(&out, "devs:").split_whitespace().collect();
    assert_eq!(devs.len(), 2, "{out}");
    assert_ne!(devs[0], devs[1], "the submount has a device of its own");
    assert_eq!(line_after(&out, "inside:"), "on the tmpfs");
    assert_eq!(line_after(&out, "mounted:"), "1", "{out}");
}

/// With --posix-acl the guest's kernel checks access against ACLs set from
/// inside the guest, a default ACL decides what new files get (the umask
/// does not), and the ACLs are the host files' own.
#[test]
fn posix_acls_set_in_the_guest_grant_access_and_are_inherited() {
    if tests::require(guest::qemu_available()).is_none() {
        return;
    }
    let (Some(setfacl), Some(getfacl), Some(setpriv)) = (
        tests::require_program("setfacl", "apt-get install acl"),
        tests::require_program("getfacl", "apt-get install acl"),
        tests::require_program("setpriv", "apt-get install util-linux"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), &["--posix-acl"]);
    let mut qemu = Qemu::new();
    for tool in [&setfacl, &getfacl, &setpriv] {
        qemu = qemu.tool(tool).expect("a guest tool");
    }
    let script = r#"
echo secret > f; chmod 600 f
TOOL_RUN /tools/setfacl -m u:4242:r f
echo "acl: $(TOOL_RUN /tools/getfacl -cp f | grep '^user:4242')"
echo "as-4242: $(TOOL_RUN /tools/setpriv --reuid=4242 --regid=4242 --clear-groups cat f 2>/dev/null || echo denied)"
echo "as-4343: $(TOOL_RUN /tools/setpriv --reuid=4343 --regid=4343 --clear-groups cat f 2>/dev/null || echo denied)"
mkdir d
TOOL_RUN /tools/setfacl -d -m u:4242:rwx d
umask 077; : > d/new; mkdir d/sub; umask 022
echo "inherited: $(TOOL_RUN /tools/getfacl -cp d/new | grep '^user:4242' | cut -f1)"
echo "modes: $(stat -c %a d/new) $(stat -c %a d/sub)"
"#
    .replace("TOOL_RUN", guest::TOOL_RUN);
    let run = boot_with(&d, &script, qemu);
    let out = run.script_output();
    assert_eq!(
        run.exit_code,
        0,
        "{out}\n--- console ---\n{}\n--- daemon ---\n{}",
        run.serial,
        d.output()
    );
    assert_eq!(line_after(&out, "acl:"), "user:4242:r--");
    // Mode 600 alone would refuse uid 4242; the ACL entry lets it read,
    // and nobody else.
    assert_eq!(line_after(&out, "as-4242:"), "secret");
    assert_eq!(line_after(&out, "as-4343:"), "denied");
    // Made under umask 077 in a directory with a default ACL: the ACL
    // decides (group bits = its mask), not the umask.
    assert_eq!(line_after(&out, "inherited:"), "user:4242:rwx");
    assert_eq!(line_after(&out, "modes:"), "664 775");
    // The host file carries the ACL the guest set.
    let host = Command::new(&getfacl)
        .args(["-cp"])
        .arg(dir.path().join("f"))
        .output()
        .unwrap();
    let host = String::from_utf8_lossy(&host.stdout);
    assert!(host.lines().any(|l| l == "user:4242:r--"), "{host}");
}
