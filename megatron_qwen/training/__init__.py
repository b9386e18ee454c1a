"""Training: the loop every stage shares, and what it is made of.

At the top: the loop (``loop.py``), one optimizer step and evaluation on megatron's schedules
(``step.py``), the contract a stage fulfils (``stage.py``), the optimizer and LR schedule
(``optim.py``), metrics and their sinks (``metrics.py``,
``moe_metrics.py``, ``window.py``). The folders:

- ``stages/``: what differs between pretraining, long context, SFT, DPO and GRPO (the stage
  table, each stage's data, loss and metrics, with DPO's and GRPO's own math beside them);
- ``checkpointing/``: checkpoint state, directories and the resume choice, manifests, the saver,
  and megatron-core's distributed-optimizer checkpoints with torch's Adam (``torch_adam_fixes.py``);
- ``resilience/``: NaN/spike guard, hang watchdog, stop signals, fault injection, manual GC.
"""
