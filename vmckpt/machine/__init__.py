"""The machine: what vmckpt asks QEMU to emulate and how it runs it — the guest spec
(spec.py), the QEMU binary and qemu-img (binary.py), the QEMU process and its command line
(qemu.py), boot media (bootmedia.py), a running guest's liveness (liveness.py) and why a new
guest is silent (diagnose.py). It knows no store, session or mechanism."""
