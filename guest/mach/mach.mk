# Included by guest/Makefile: a GNU Mach guest from Debian's packages alone.
#
# The kernel is Debian's gnumach-image-1.8-486 for i386 (a 32-bit multiboot
# ELF that QEMU's -kernel loads as it is). The amd64 archive's package of the
# same name is an x86_64 kernel for 32-bit user tasks whose system call entry
# is still `ud2` in this snapshot, so no user task can run on it. The i386
# package is taken from guest/gnumach/ of this repository (Debian 13 machines get
# no i386 packages from apt), else downloaded with apt, which needs
# `dpkg --add-architecture i386` (scripts/install-deps.sh adds it only then).
# The bootstrap task (mach/bootstrap.c) is this project's: a static ELF32
# program without libc that GNU Mach starts from a boot-script module string
# and that prints its workload state on the console through Mach IPC.

MACH_PKG       ?= gnumach-image-1.8-486:i386
GNUMACH_DEB    ?= $(firstword $(wildcard $(GUEST_IMAGES)/gnumach/gnumach-image-*_i386.deb))
MACH_KERNEL    := $(BUILD)/gnumach
MACH_BOOTSTRAP := $(BUILD)/mach-bootstrap
MACH_MODULE     = $(MACH_BOOTSTRAP) $${device-port} pages=$(PAGES) hz=$(HZ) $$(task-create) $$(task-resume)
MACH_CFLAGS    := -m32 -march=i486 -O2 -Wall -Wextra -ffreestanding -fno-pic -fno-stack-protector \
                  -fno-asynchronous-unwind-tables -nostdlib -static -no-pie -Wl,--build-id=none

.PHONY: mach boot-mach clean-mach gnumach-deb-path

mach: $(MACH_KERNEL) $(MACH_BOOTSTRAP)

# Succeeds (and prints it) when a local copy of the package makes apt unnecessary.
gnumach-deb-path:
	@test -n "$(GNUMACH_DEB)" && echo "$(GNUMACH_DEB)"

$(DEBS)/gnumach.stamp:
	@mkdir -p $(DEBS)
	set -e; cd $(DEBS); \
	if ! ls gnumach-image-*_i386.deb >/dev/null 2>&1; then \
	  if [ -n "$(GNUMACH_DEB)" ]; then cp "$(abspath $(GNUMACH_DEB))" .; \
	  else $(APT_DL) "$(MACH_PKG)" || { echo "cannot download $(MACH_PKG): run scripts/install-deps.sh test (adds the i386 architecture)" >&2; exit 1; }; fi; \
	fi
	touch $@

$(MACH_KERNEL): $(DEBS)/gnumach.stamp
	dpkg-deb --fsys-tarfile $$(ls -t $(DEBS)/gnumach-image-*_i386.deb | head -n1) \
	  | tar -xO --wildcards './boot/gnumach-*.gz' | gzip -dc > $@.tmp
	test -s $@.tmp
	mv $@.tmp $@

$(MACH_BOOTSTRAP): mach/bootstrap.c
	@mkdir -p $(BUILD)
	$(CC) $(MACH_CFLAGS) -o $@.tmp $<
	mv $@.tmp $@

boot-mach: mach
	$(QEMU) -accel tcg -m $(MEM) -nographic -no-reboot -kernel $(MACH_KERNEL) \
	  -initrd '$(MACH_MODULE)' -append console=com0

clean: clean-mach
clean-mach:
	rm -f $(MACH_KERNEL) $(MACH_KERNEL).tmp $(MACH_BOOTSTRAP) $(MACH_BOOTSTRAP).tmp
