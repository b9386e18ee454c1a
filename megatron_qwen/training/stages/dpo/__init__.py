"""stage=dpo: the stage (``stage.py``) and trl's DPO losses and metrics (``loss.py``); its frozen
reference is shared with GRPO (``stages/reference.py``)."""
