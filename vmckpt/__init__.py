"""vmckpt: incremental, short-pause checkpoints of whole QEMU guests."""

__version__ = "0.1.0"
