# The panic switch of the initramfs (included by Makefile): /etc/vmckpt-panic.sh (sourced by
# /init) and the pvpanic driver, taken from the same Debian kernel package as vmlinuz.
PANIC_MODULES := kernel/drivers/misc/pvpanic/pvpanic.ko kernel/drivers/misc/pvpanic/pvpanic-mmio.ko

$(BUILD)/panicroot.stamp: $(DEBS)/kernel.stamp panic.sh panic.mk
	rm -rf $(BUILD)/panicroot $(BUILD)/pmod
	mkdir -p $(BUILD)/panicroot/lib/modules $(BUILD)/panicroot/etc $(BUILD)/pmod
	dpkg-deb --fsys-tarfile $$(ls -t $(DEBS)/linux-image-$(KSERIES).*-amd64_*.deb | head -n1) \
	  | tar -x -C $(BUILD)/pmod --wildcards $(addprefix ./lib/modules/*/,$(PANIC_MODULES))
	for m in $(PANIC_MODULES); do cp $(BUILD)/pmod/lib/modules/*/$$m $(BUILD)/panicroot/lib/modules/; done
	rm -rf $(BUILD)/pmod
	cp panic.sh $(BUILD)/panicroot/etc/vmckpt-panic.sh
	touch $@
