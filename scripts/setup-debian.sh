#!/usr/bin/env bash
# Installs what building, running and testing this workspace needs on Debian 12
# (bookworm), as root. Safe to run again: it only adds what is missing.
#
#   Rust:     a toolchain >= 1.85 (rustup); Debian's own cargo is too old.
#   Packages: QEMU (the compatibility VMM and the guest test bed), the host's
#             cloud kernel and static busybox (the guest image is built from
#             them), qemu-storage-daemon (the block peer), passt (the
#             default VM's network, through net-backend), and the C libraries
#             virtiofsd (the fs peer) builds against.
#   Peers:    virtiofsd 1.14 from crates.io, for side-by-side tests and benches.
#   Suites:   pjdfstest 0.2 from crates.io, the POSIX filesystem test suite.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-debian.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi

packages=(
    qemu-system-x86      # QEMU: compatibility VMM and guest test bed
    qemu-system-common   # qemu-storage-daemon: the vhost-user-blk peer
    linux-image-cloud-amd64 # the guest kernel and its virtio/fuse modules
    busybox-static       # the guest's userland
    libseccomp-dev libcap-ng-dev pkg-config # virtiofsd's build dependencies
    iproute2             # network namespaces and taps for net tests
    passt                # user-mode networking (no root, no tap) for net-backend
    e2fsprogs util-linux # e2fsck/debugfs check guest-made filesystems; blkdiscard, fallocate
    systemd              # systemd-analyze verifies the generated units
    xz-utils zstd        # compressed kernel modules, where the kernel has them
    lz4                  # unpacks the ELF kernel from a bzImage for vmm-core's boot test
    acl                  # setfacl/getfacl: ACLs set in a guest on a virtio-fs share
    gdb gdbserver        # orchestrator attach --gdb, and its test
    socat                # a UDP echo server in the guest, for a forwarded UDP port
)
echo "setup: apt-get update"
apt-get update -qq
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: no cargo found. Install Rust >= 1.85 with rustup (https://rustup.rs), then run this again." >&2
    exit 1
fi

virtiofsd_version=1.14.0
if ! "${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd" --version 2>/dev/null | grep -q "$virtiofsd_version"; then
    echo "setup: cargo install virtiofsd $virtiofsd_version (the peer; about two minutes on 2 cores)"
    cargo install --quiet --locked virtiofsd --version "$virtiofsd_version"
fi
pjdfstest_version=0.2.2
if ! "${CARGO_HOME:-$HOME/.cargo}/bin/pjdfstest" --version 2>/dev/null | grep -q "$pjdfstest_version"; then
    echo "setup: cargo install pjdfstest $pjdfstest_version (the POSIX filesystem test suite)"
    cargo install --quiet --locked pjdfstest --version "$pjdfstest_version"
fi
echo "setup: done"
