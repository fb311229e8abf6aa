#!/bin/sh
# vmckpt's Debian test guest: a service that keeps a counter both in its memory (a shell
# variable) and in a 4 KiB block of a file on the root disk, read and written with O_DIRECT
# (the disk, not the page cache). Each second it reads the block back, checks that the disk
# holds what memory says, then counts on and writes the new value. A guest restored with a
# disk older or newer than its memory prints COUNTERBAD. Each line carries the guest's clock
# (t=, seconds since the epoch): a restore steps it to now through the guest agent.
f=/var/lib/vmckpt-counter
n=0
printf '%-4095s\n' "$n" | dd of=$f bs=4096 count=1 oflag=direct conv=notrunc status=none
echo "COUNTER start"
while :; do
	m=$(dd if=$f bs=4096 count=1 iflag=direct status=none | tr -d ' \n')
	if [ "$m" = "$n" ]; then
		n=$((n + 1))
		printf '%-4095s\n' "$n" | dd of=$f bs=4096 count=1 oflag=direct conv=notrunc status=none
		echo "COUNTER n=$n ok t=$(date +%s)"
	else
		echo "COUNTERBAD memory=$n disk=$m"
	fi
	sleep 1
done
