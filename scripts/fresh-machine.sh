#!/bin/bash
# The README's first command on a fresh Debian machine: a minimal Debian root made with
# debootstrap (bookworm unless SUITE says otherwise), this machine's /dev, /proc and /sys
# bound into it (QEMU needs /dev/kvm or TCG, /dev/userfaultfd), a fresh clone of this
# repository in it, and `make demo` (or the command given) run there as root.
#
#   sudo scripts/fresh-machine.sh [ROOT] [-- COMMAND...]    (default ROOT: a new /tmp/vmckpt-fresh.*)
#
# A machine of this environment also has what its image adds to Debian: extra CA
# certificates (a TLS-inspecting egress), pip's configuration and the package mirrors it
# names; those are copied in as they are here, nothing else. The Debian mirror is the one
# this machine's apt uses. Everything is unmounted at the end; ROOT stays for a look.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
suite=${SUITE:-bookworm}
root=${1:-$(mktemp -d /tmp/vmckpt-fresh.XXXXXX)}
shift $(($# > 0 ? 1 : 0))
[ "${1:-}" = "--" ] && shift
command=${*:-make demo}
[ "$(id -u)" = 0 ] || { echo "fresh-machine.sh: run as root (debootstrap, chroot)" >&2; exit 1; }
mirror=$(awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list.d/*.sources \
    2>/dev/null || true)
[ -n "$mirror" ] || { echo "fresh-machine.sh: no Debian mirror in /etc/apt" >&2; exit 1; }

mounted=()
cleanup() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}" || true; done
}
trap cleanup EXIT
bind() { # SOURCE DIR MOUNT-OPTIONS...
    local source=$1 dir=$2
    shift 2
    mkdir -p "$root/$dir"
    mount "$@" "$source" "$root/$dir"
    mounted+=("$root/$dir")
}

if [ ! -e "$root/.debootstrapped" ]; then
    debootstrap --variant=minbase --include=git,make,ca-certificates "$suite" "$root" "$mirror"
    touch "$root/.debootstrapped"
fi
# A fresh machine's apt sources: the suite, its updates and security (no backports: vmckpt's
# install script enables what it needs from them).
rm -f "$root/etc/apt/sources.list"
security=$(awk '/^URIs:/ && $2 ~ /security/ { print $2; exit }' /etc/apt/sources.list.d/*.sources \
    2>/dev/null || true)
{
    printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\n' "$mirror" "$suite" "$suite"
    printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    if [ -n "$security" ]; then
        printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\n' "$security" "$suite"
        printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    fi
} >"$root/etc/apt/sources.list.d/debian.sources"
# What this environment's image adds.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
[ -e /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
[ -d /etc/xdg/pip ] && mkdir -p "$root/etc/xdg" && cp -r /etc/xdg/pip "$root/etc/xdg/"
[ -d /opt ] && bind /opt opt --bind
cp /etc/resolv.conf "$root/etc/resolv.conf"

bind /proc proc --bind
bind /sys sys --bind
bind /dev dev --bind
bind /dev/pts dev/pts --bind
bind tmpfs run -t tmpfs # its own /run (not this machine's /run/vmckpt)
rm -rf "$root/root/vmckpt"
git clone -q "$repo" "$root/root/vmckpt"
keep=$(env | grep -E '^(PIP_[A-Z_]+|SSL_CERT_FILE|REQUESTS_CA_BUNDLE)=' | tr '\n' ' ' || true)
echo "fresh-machine.sh: $suite in $root, running: $command"
chroot "$root" /usr/bin/env -i HOME=/root TERM="${TERM:-dumb}" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin $keep \
    /bin/bash -c "cd /root/vmckpt && time $command"
