# vmckpt test guest: a kernel panic on request, sourced by /init (busybox sh); for the tests of
# vmckpt's liveness check. With vmckpt.panic_after=SECONDS on the kernel command line: load
# the pvpanic driver (modules from the Debian kernel package), so QEMU hears of the panic when
# the VM has a pvpanic device (-device pvpanic), and crash the kernel (sysrq c) that many
# seconds after /init started. Without the parameter nothing happens.
after=$(sed -n 's/.*vmckpt\.panic_after=\([0-9][0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$after" ]; then
	insmod /lib/modules/pvpanic.ko 2>/dev/null
	insmod /lib/modules/pvpanic-mmio.ko 2>/dev/null
	(sleep "$after"; echo "VMCKPT-GUEST panicking"; echo c > /proc/sysrq-trigger) &
fi
