"""Checkpoints: what a checkpoint holds and how it loads at any layout (``checkpoint.py``), run
directories and which checkpoint a run resumes (``ckpt_dirs.py``), per-file checksums that tell
a complete checkpoint from a damaged one (``manifest.py``), the sync/async writer (``saver.py``), and
two megatron-core 0.16.1 fixes for distributed-optimizer checkpoints with torch's Adam
(``torch_adam_fixes.py``)."""
