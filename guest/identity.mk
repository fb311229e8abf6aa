# The identity report of the initramfs (included by Makefile): /etc/vmckpt-identity.sh, sourced
# by /init (vmckpt.identity=1).
$(BUILD)/identityroot.stamp: identity.sh identity.mk
	rm -rf $(BUILD)/identityroot
	mkdir -p $(BUILD)/identityroot/etc
	cp identity.sh $(BUILD)/identityroot/etc/vmckpt-identity.sh
	touch $@
