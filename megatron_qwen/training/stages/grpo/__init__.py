"""stage=grpo: the stage (``stage.py``), rollouts into packed micro-batches (``rollout.py``),
verifiable rewards (``rewards.py``), the clipped policy-gradient loss with its KL term
(``loss.py``) and the output layer applied at completion positions only (``selected_logits.py``)."""
