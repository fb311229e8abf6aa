# vmckpt test guest: disk workload setup, sourced by /init (busybox sh).
# With vmckpt.disk=DEV on the kernel command line: load the virtio block driver
# (modules from the Debian kernel package, in dependency order) and start
# /diskload in the background; it writes and verifies raw blocks on DEV.
if grep -q 'vmckpt\.disk=' /proc/cmdline; then
	for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
		insmod /lib/modules/$m.ko 2>/dev/null
	done
	dev=$(sed -n 's/.*vmckpt\.disk=\([^ ]*\).*/\1/p' /proc/cmdline)
	i=0
	while [ ! -b "$dev" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
	[ -b "$dev" ] || echo "DISKLOAD error $dev did not appear"
	/diskload &
fi
