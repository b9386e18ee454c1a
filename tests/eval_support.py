"""lm-eval's own ``hf`` model on an exported checkpoint: the reference our adapter is checked against."""

from __future__ import annotations

from megatron_qwen.evaluation.registry import offline, task_specs


def hf_lm_eval(hf_dir, tasks, limit: int, log_samples: bool = False, **model_args) -> dict:
    """lm-eval's results for the shipped offline ``tasks`` on the HF checkpoint ``hf_dir`` (fp32,
    CPU, batch size 1, the tokenizer the export carries, no bootstrapped standard errors)."""
    offline()
    import lm_eval

    return lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32",
                                                           "device": "cpu", **model_args},
                                   tasks=task_specs(tasks), limit=limit, bootstrap_iters=0,
                                   log_samples=log_samples, batch_size=1)
