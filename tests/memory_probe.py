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
  the rows one rank samples together in a rollout;
- ``packed_mask`` (stage=grpo): the local attention's additive mask of the packed row [t, t],
  saved once per micro-batch and not in ``activations`` (the estimate leaves it out: Transformer
  Engine's THD kernels have none).

A micro-batch has the schedule's rows (a DPO pair: 2, a GRPO prompt: G; config/shapes.py). For
stage=grpo it is what GRPO trains on: the rows packed into one THD row, each a prompt and
``max_new_tokens`` completion tokens filling ``seq_length``, through the stage's own forward and
loss (the output layer at the completion positions only, training/stages/grpo/selected_logits.py).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_qwen.config import validate  # noqa: E402
from megatron_qwen.config.store import compose_config  # noqa: E402


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@contextlib.contextmanager
def saved_storages(params: Set[int]) -> Iterator[Dict[int, int]]:
    """Bytes of each distinct non-parameter storage autograd saves for backward inside the block."""
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if _ptr(t) not in params:
            storages[_ptr(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


def saved_activation_bytes(chunk: torch.nn.Module, tokens: torch.Tensor, params: Set[int]) -> int:
    """Bytes of the distinct non-parameter storages saved for backward by one forward."""
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    with saved_storages(params) as storages:
        loss = chunk(tokens, position_ids, None, labels=tokens)  # [b, s] per-token loss
    loss.sum().backward()
    return sum(storages.values())


def grpo_saved_activation_bytes(cfg, chunk: torch.nn.Module, tokens: torch.Tensor,
                                params: Set[int]) -> Tuple[int, int]:
    """:func:`saved_activation_bytes` of a GRPO training micro-batch, the rows ``tokens`` [rows, s + 1]
    as rollouts (a prompt, then ``max_new_tokens`` completion tokens) packed and scored as in training,
    without the packed row's attention mask; and that mask's bytes."""
    from megatron_qwen.generation.engine import Rollouts
    from megatron_qwen.model.cp_attention import attention_view
    from megatron_qwen.training.stages.grpo.rollout import micro_batches
    from megatron_qwen.training.stages.grpo.stage import STEP_FIELDS, GRPOStage
    from megatron_qwen.training.step import prepare_micro_batch

    st, t, p = cfg.stage, cfg.train, cfg.parallel
    ids, prompt = tokens.tolist(), tokens.shape[1] - st.max_new_tokens
    rollouts = Rollouts([row[:prompt] for row in ids], [row[prompt:] for row in ids], [True] * len(ids))
    fields = {"reward": torch.arange(len(ids), dtype=torch.float32), "advantages": torch.ones(len(ids))}
    [batch] = micro_batches(rollouts, fields, st.group_size, range(t.micro_batch_size), t.micro_batch_size, None,
                            t.seq_length, p.tp if p.sp else 1)
    batch.update({name: torch.zeros(2) for name in STEP_FIELDS})  # the step's throughput fields
    batch, packed_seq_params = prepare_micro_batch(batch)
    with saved_storages(params) as storages:
        output, loss_func = GRPOStage(cfg).forward_step(chunk, batch, packed_seq_params)
        loss, _, _ = loss_func(output)
    loss.backward()
    # The view the forward's attention built (cached per packed row and dtype).
    dtype = next(p for p in chunk.parameters()).dtype
    mask = attention_view(batch["tokens"].shape[1], None, packed_seq_params, batch["tokens"].device, dtype).mask
    mask_bytes = storages.pop(_ptr(mask))  # a KeyError: the training path no longer saves this mask
    return sum(storages.values()), mask_bytes


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
    grpo = cfg.stage.name == "grpo"  # rollout rows: prompt + completion = seq_length + 1 tokens
    tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch_rows(cfg), cfg.train.seq_length + grpo),
                           generator=torch.Generator().manual_seed(0))
    result = {}
    if grpo:
        result["activations"], result["packed_mask"] = grpo_saved_activation_bytes(cfg, model[0], tokens, params)
    else:
        result["activations"] = saved_activation_bytes(model[0], tokens, params)
    optimizer.step()
    result["states"] = state_bytes(model, optimizer)
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
