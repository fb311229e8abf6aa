#!/usr/bin/env bash
# Installs what vmckpt, its test guest and its tests need on Debian bookworm:
# QEMU 10 from bookworm-backports, the guest's build inputs, and the Python
# packages. Idempotent; run as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# bookworm-backports is enabled from the mirror the machine already uses:
# the URIs come from the existing debian.sources, so no host name is written here.
enable_backports() {
    local src=/etc/apt/sources.list.d/debian.sources
    local dst=/etc/apt/sources.list.d/vmckpt-backports.sources
    [ -e "$dst" ] && return 0
    if [ -r "$src" ]; then
        awk 'BEGIN{RS=""; ORS="\n\n"} /Suites:[^\n]*bookworm-updates/ {
                 sub(/Suites:[^\n]*/, "Suites: bookworm-backports"); print }' "$src" \
            | $SUDO tee "$dst" >/dev/null
    elif [ -r /etc/apt/sources.list ]; then
        grep -E '^deb .* bookworm main' /etc/apt/sources.list | head -n1 \
            | sed 's/ bookworm main/ bookworm-backports main/' \
            | $SUDO tee /etc/apt/sources.list.d/vmckpt-backports.list >/dev/null
    fi
}

enable_backports
# The GNU Mach test guest uses Debian's i386 gnumach image (guest/mach/mach.mk
# explains why not the amd64 one); `make -C guest mach` downloads it.
dpkg --print-foreign-architectures | grep -qx i386 || $SUDO dpkg --add-architecture i386
export DEBIAN_FRONTEND=noninteractive
# A mirror mid-sync can fail one index (seen: bookworm-security i386); retry, then
# go on with what was fetched: a package that is really missing fails below, loudly.
for attempt in 1 2 3; do
    $SUDO apt-get update -qq && break
    echo "apt-get update failed (attempt $attempt); retrying" >&2
    sleep 5
done
$SUDO apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
# The ISO test guest: GRUB 2 for BIOS, grub-mkrescue and what it needs.
$SUDO apt-get install -y -qq grub-pc-bin grub-common xorriso mtools binutils >/dev/null
$SUDO apt-get install -y -qq busybox-static cpio gzip gcc libc6-dev \
    openssh-server openssh-client iproute2 file >/dev/null
# libvirt domains (vmckpt --libvirt, tests/test_libvirt.py starts libvirtd itself);
# libvirt-dev and pkg-config let pip build libvirt-python for this Python.
$SUDO apt-get install -y -qq libvirt-daemon-system libvirt-clients libvirt-dev pkg-config >/dev/null

python3 -m pip install -q --disable-pip-version-check -e '.[dev]'
