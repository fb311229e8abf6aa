#!/bin/sh
# vmckpt's Debian test guest: Debian 12 (bookworm) with systemd on a 2 GiB qcow2 root disk,
# booted directly (its own kernel and initramfs beside the disk), running the counter
# service (counter.sh). Built from Debian packages with debootstrap, as root:
#
#   sh guest/debian/build.sh [OUT]        (default OUT: guest/build/debian)
#
# OUT gets vmlinuz, initrd.img and root.qcow2 (kernel command line:
# "root=/dev/vda rw console=ttyS0"). The Debian mirror is the one this machine's apt already
# uses (no host name is written here); MIRROR overrides it.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../build/debian}
mirror=${MIRROR:-}
if [ -z "$mirror" ]; then
	mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
		| awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }')
fi
if [ -z "$mirror" ]; then
	mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
		| awk '$1 == "deb" && $2 ~ /^https?:/ && $2 !~ /security/ { print $2; exit }')
fi
[ -n "$mirror" ] || { echo "build.sh: no Debian mirror in /etc/apt; set MIRROR" >&2; exit 1; }
root=$out/root
# qemu-guest-agent: a restore steps the guest's clock through it (udev starts it when the
# channel vmckpt gives its guests appears).
packages=systemd,systemd-sysv,udev,linux-image-amd64,initramfs-tools,procps,qemu-guest-agent
mkdir -p "$out"
if [ "$(cat "$out/root.stamp" 2>/dev/null)" = "$packages" ] && [ -e "$out/root.qcow2" ] \
		&& [ -z "$(find "$here" -type f -newer "$out/root.qcow2")" ]; then
	exit 0 # up to date
fi
if [ "$(cat "$out/root.stamp" 2>/dev/null)" != "$packages" ]; then
	rm -rf "$root" "$out/root.stamp"
	debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror"
	echo "$packages" > "$out/root.stamp"
fi
echo vmckpt-debian > "$root/etc/hostname"
echo "/dev/vda / ext4 rw,relatime 0 1" > "$root/etc/fstab"
install -m 755 "$here/counter.sh" "$root/usr/local/sbin/vmckpt-counter"
install -m 644 "$here/vmckpt-counter.service" "$root/etc/systemd/system/vmckpt-counter.service"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/vmckpt-counter.service \
	"$root/etc/systemd/system/multi-user.target.wants/vmckpt-counter.service"
# The serial console is the counter's: no login prompt on it.
ln -sf /dev/null "$root/etc/systemd/system/serial-getty@ttyS0.service"
cp "$(ls "$root"/boot/vmlinuz-* | tail -n1)" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
cp "$(ls "$root"/boot/initrd.img-* | tail -n1)" "$out/initrd.img.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
rm -f "$root"/var/cache/apt/archives/*.deb
rm -f "$out/root.raw"
mkfs.ext4 -q -F -L root -d "$root" "$out/root.raw" 2G
qemu-img convert -f raw -O qcow2 "$out/root.raw" "$out/root.qcow2.tmp"
mv "$out/root.qcow2.tmp" "$out/root.qcow2"
rm -f "$out/root.raw"
chmod 644 "$out/vmlinuz" "$out/initrd.img" "$out/root.qcow2"
