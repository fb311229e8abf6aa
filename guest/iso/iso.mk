# Included by guest/Makefile: the test guest as a bootable ISO (GRUB 2 for
# BIOS, from Debian's grub-pc-bin; grub-mkrescue needs xorriso and mtools).
# The same kernel, initramfs and command line as `make -C guest`; GRUB talks
# on the serial console and boots at once (timeout 0).

ISO      := $(BUILD)/vmckpt-guest.iso
ISO_ROOT := $(BUILD)/iso-root
ISO_CFG  := $(BUILD)/iso-grub.cfg

.PHONY: iso boot-iso FORCE

iso: $(ISO)

# Rewritten only when the command line changes, so the ISO (and its hash,
# which restore checks) stays the same across `make` runs.
$(ISO_CFG): iso/grub.cfg.in FORCE
	@mkdir -p $(BUILD)
	@sed 's|@APPEND@|$(APPEND)|' iso/grub.cfg.in > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

$(ISO): $(ISO_CFG) $(BUILD)/vmlinuz $(BUILD)/initrd.img
	@command -v grub-mkrescue >/dev/null || { echo "grub-mkrescue missing: apt-get install grub-pc-bin grub-common xorriso mtools" >&2; exit 1; }
	@test -d /usr/lib/grub/i386-pc || { echo "GRUB for BIOS missing: apt-get install grub-pc-bin" >&2; exit 1; }
	rm -rf $(ISO_ROOT)
	mkdir -p $(ISO_ROOT)/boot/grub
	cp $(BUILD)/vmlinuz $(BUILD)/initrd.img $(ISO_ROOT)/boot/
	cp $(ISO_CFG) $(ISO_ROOT)/boot/grub/grub.cfg
	grub-mkrescue -o $@.tmp $(ISO_ROOT) 2>$(BUILD)/grub-mkrescue.log || { cat $(BUILD)/grub-mkrescue.log >&2; exit 1; }
	rm -rf $(ISO_ROOT)
	mv $@.tmp $@

boot-iso: $(ISO)
	$(QEMU) -accel tcg -m $(MEM) -nographic -no-reboot -cdrom $(ISO) -boot d

FORCE:

.PHONY: clean-iso
clean: clean-iso
clean-iso:
	rm -rf $(ISO) $(ISO).tmp $(ISO_ROOT) $(ISO_CFG) $(ISO_CFG).new $(BUILD)/grub-mkrescue.log
