# vmckpt test guest: the VM generation ID's notifications, sourced by /init (busybox sh). With
# vmckpt.identity=1 on the kernel command line, a background loop prints on the console, at
# start and whenever it changes (checked every second), the line
#   IDENTITY gpe05=<n> forks=<m> driver=<yes|no>
# n: the ACPI GPE 05 interrupts the kernel counted (/sys/firmware/acpi/interrupts/gpe05; QEMU's
# vmgenid device raises GPE 05 after a restore loaded its state); m: how often the kernel logged
# "crng reseeded due to virtual machine fork" (its vmgenid driver reseeds the random number
# generator when the generation ID changed, not when it stayed the same); driver: whether the
# kernel's vmgenid driver is there. Without the parameter nothing happens.
if grep -q 'vmckpt\.identity=1' /proc/cmdline; then
	(
		# The kernel reseeds on a new generation ID only once its random number generator is
		# ready: a read of /dev/random waits for that (the kernel gathers timer jitter meanwhile).
		dd if=/dev/random of=/dev/null bs=1 count=1 2>/dev/null
		driver=no
		[ -d /sys/bus/acpi/drivers/vmgenid ] && driver=yes
		last=""
		while :; do
			set -- $(cat /sys/firmware/acpi/interrupts/gpe05 2>/dev/null)
			forks=$(dmesg | grep -c 'crng reseeded due to virtual machine fork')
			now="gpe05=${1:-none} forks=$forks driver=$driver"
			if [ "$now" != "$last" ]; then
				echo "IDENTITY $now"
				last=$now
			fi
			sleep 1
		done
	) &
fi
