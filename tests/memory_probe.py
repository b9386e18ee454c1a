"""Measures what the memory estimate predicts, on CPU: run under torchrun with 2 ranks.

    python -m torch.distributed.run --nproc-per-node 2 tests/memory_probe.py OUT.json CASE...

A CASE is a comma-separated list of Hydra overrides (e.g. ``parallel=tp2,precision=bf16``).
For each case (one process group, megatron's parallel state re-created per case) rank 0
records:

- ``activations``: bytes of the distinct storages that autograd saves for backward during
  one micro-batch's forward (``torch.autograd.graph.saved_tensors_hooks``), parameters
  excluded; what a pipeline stage keeps per micro-batch in flight;
- ``states``: parameters, megatron DDP's gradient buffers and the optimizer's own tensors
  (fp32 main copies, Adam moments) after one optimizer step, each storage counted once;
- ``kv_cache`` (stage=grpo): bytes of megatron's static KV cache after a one-token prefill of
  the rows one rank samples together in a rollout.

A micro-batch has the schedule's rows (a DPO pair: 2, a GRPO prompt: G; config/shapes.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Set

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_qwen.config import validate  # noqa: E402
from megatron_qwen.config.store import compose_config  # noqa: E402


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def saved_activation_bytes(chunk: torch.nn.Module, tokens: torch.Tensor, params: Set[int]) -> int:
    """Bytes of the distinct non-parameter storages saved for backward by one forward."""
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if _ptr(t) not in params:
            storages[_ptr(t)] = t.untyped_storage().nbytes()
        return t

    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunk(tokens, position_ids, None, labels=tokens)  # [b, s] per-token loss
    loss.sum().backward()
    return sum(storages.values())


def kv_cache_bytes(chunk: torch.nn.Module, rows: int, max_length: int) -> int:
    """Bytes of the static KV cache megatron allocates for ``rows`` rows of ``max_length`` positions."""
    from megatron.core.inference.contexts import StaticInferenceContext

    context = StaticInferenceContext(rows, max_length)
    chunk.eval()
    with torch.no_grad():
        chunk(torch.zeros(rows, 1, dtype=torch.long), torch.zeros(rows, 1, dtype=torch.long), None,
              inference_context=context, runtime_gather_output=True)
    chunk.train()
    return sum(t.untyped_storage().nbytes() for pair in context.key_value_memory_dict.values() for t in pair)


def state_bytes(model: List[torch.nn.Module], optimizer) -> int:
    """Parameters + DDP gradient buffers + optimizer tensors, each storage once."""
    seen: Dict[int, int] = {}
    for chunk in model:
        for p in chunk.parameters():
            seen[_ptr(p)] = p.untyped_storage().nbytes()
        for buffer in chunk.buffers + chunk.expert_parallel_buffers:
            seen[_ptr(buffer.grad_data)] = buffer.grad_data.untyped_storage().nbytes()
            if buffer.param_data is not None:  # params live in this buffer (distributed optimizer)
                seen[_ptr(buffer.param_data)] = buffer.param_data.untyped_storage().nbytes()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        tensors = [p for group in inner.param_groups for p in group["params"]]
        tensors += [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]
        for t in tensors:
            seen.setdefault(_ptr(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def measure(overrides: List[str]) -> Dict[str, int]:
    from megatron.core import parallel_state

    from megatron_qwen.config.shapes import micro_batch_rows, rollout_rows
    from megatron_qwen.config.translate import to_transformer_config
    from megatron_qwen.model.build import build_model
    from megatron_qwen.platform.parallel import adapt_to_backend, init_model_parallel
    from megatron_qwen.training.optim import build_optimizer, wrap_model

    cfg = validate(compose_config(overrides), torch.distributed.get_world_size())
    init_model_parallel(cfg)
    config = to_transformer_config(cfg)
    adapt_to_backend(config)
    model = wrap_model(cfg, build_model(cfg.model, config, cfg.train.seed))
    optimizer = build_optimizer(cfg, model)
    params = {_ptr(p) for p in model[0].parameters()}
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch_rows(cfg), cfg.train.seq_length),
                           generator=torch.Generator().manual_seed(0))
    activations = saved_activation_bytes(model[0], tokens, params)
    optimizer.step()
    result = {"activations": activations, "states": state_bytes(model, optimizer)}
    if rollout_rows(cfg):
        result["kv_cache"] = kv_cache_bytes(model[0], rollout_rows(cfg), cfg.train.seq_length)
    parallel_state.destroy_model_parallel()
    return result


def main() -> None:
    from megatron_qwen.platform.launch import detect_process_env, init_process_group

    out, cases = Path(sys.argv[1]), sys.argv[2:]
    penv = detect_process_env()
    init_process_group(penv, "gloo")
    results = {case: measure(case.split(",")) for case in cases}
    if penv.rank == 0:
        out.write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
