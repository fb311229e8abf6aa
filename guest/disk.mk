# The disk workload's part of the initramfs (included by Makefile): /diskload,
# /etc/vmckpt-disk.sh (sourced by /init) and the virtio block modules, taken
# from the same Debian kernel package as vmlinuz.
DISK_MODULES := kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko \
	kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
	kernel/drivers/virtio/virtio_pci.ko kernel/drivers/block/virtio_blk.ko

$(BUILD)/diskload: diskload.c
	@mkdir -p $(BUILD)
	$(CC) $(CFLAGS) -static -o $@.tmp $<
	mv $@.tmp $@

$(BUILD)/diskroot.stamp: $(DEBS)/kernel.stamp $(BUILD)/diskload disk.sh disk.mk
	rm -rf $(BUILD)/diskroot $(BUILD)/kmod
	mkdir -p $(BUILD)/diskroot/lib/modules $(BUILD)/diskroot/etc $(BUILD)/kmod
	dpkg-deb --fsys-tarfile $$(ls -t $(DEBS)/linux-image-$(KSERIES).*-amd64_*.deb | head -n1) \
	  | tar -x -C $(BUILD)/kmod --wildcards $(addprefix ./lib/modules/*/,$(DISK_MODULES))
	for m in $(DISK_MODULES); do cp $(BUILD)/kmod/lib/modules/*/$$m $(BUILD)/diskroot/lib/modules/; done
	rm -rf $(BUILD)/kmod
	cp $(BUILD)/diskload $(BUILD)/diskroot/diskload
	cp disk.sh $(BUILD)/diskroot/etc/vmckpt-disk.sh
	chmod 755 $(BUILD)/diskroot/diskload
	touch $@
