"""One rank of the context-parallel checks (run under torchrun with 2 ranks, gloo).

1. Attention: every rank draws the same global q, k, v (fp64) and the reference, causal SDPA
   over the whole row (per sub-sequence when packed). Each rank then feeds only its
   load-balanced share to our SDPAttention at cp=2 and checks its outputs and its q/k/v
   gradients against the reference rows it holds.
2. The split equals megatron's get_batch_on_this_cp_rank, and megatron's rotary slice gives
   the same global positions.
3. Packed SFT through the trainer's forward step (the SFT stage's): a tiny model at cp=2 gives the loss sum,
   token count and gradients (summed over the CP group) of the same model at cp=1, for rows of
   conversations of different lengths with masked prompts (so the ranks count different
   numbers of loss tokens).

Prints "ok" on success.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_qwen.config.schema import Config
from megatron_qwen.config.translate import to_transformer_config
from megatron_qwen.model.build import build_model
from megatron_qwen.model.context_parallel import rank_positions, row_bounds, split_batch
from megatron_qwen.model.layers import SDPAttention
from megatron_qwen.platform import cpu_compat
from megatron_qwen.platform.parallel import init_model_parallel
from megatron_qwen.training.stages import build_stage
from megatron_qwen.training.step import prepare_micro_batch

HEADS, KV_HEADS, DIM = 4, 2, 8


def _reference(q, k, v, bounds):
    """Causal attention per sub-sequence, [S, b, h, d] in and out."""
    outs = []
    for start, end in zip(bounds.tolist(), bounds[1:].tolist()):
        qs, ks, vs = (t[start:end].permute(1, 2, 0, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        outs.append(out.permute(2, 0, 1, 3))
    return torch.cat(outs)


def _check(attention, total, batch, packed, cp, rank):
    gen = torch.Generator().manual_seed(total)
    q, k, v = (torch.randn(total, batch, h, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
               for h in (HEADS, KV_HEADS, KV_HEADS))
    weight = torch.randn(total, batch, HEADS, DIM, generator=gen, dtype=torch.float64)
    bounds = row_bounds(total, packed, torch.device("cpu"))
    (_reference(q, k, v, bounds) * weight).sum().backward()
    index = rank_positions(bounds, total, cp, rank)
    local = [t.detach()[index].clone().requires_grad_() for t in (q, k, v)]
    if packed is not None:  # megatron squeezes the batch dim of a packed row
        local = [t.detach().squeeze(1).requires_grad_() for t in local]
    out = attention(*local, None, packed_seq_params=packed)  # [s/cp, b, h*d]
    (out * weight[index].reshape(out.shape)).sum().backward()
    expected = _reference(q, k, v, bounds).detach()[index].reshape(out.shape)
    assert torch.allclose(out, expected, rtol=0, atol=1e-12), (out - expected).abs().max()
    for name, full, part in zip("qkv", (q, k, v), local):
        ref = full.grad[index].reshape(part.grad.shape)
        assert torch.allclose(part.grad, ref, rtol=0, atol=1e-12), (name, (part.grad - ref).abs().max())


def _check_split_matches_megatron(cp, rank):
    batch = {"tokens": torch.arange(24).reshape(2, 12), "labels": torch.arange(24).reshape(2, 12) + 1,
             "attention_mask": torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()}
    ours = split_batch(dict(batch), None, cp, rank)
    theirs = get_batch_on_this_cp_rank(dict(batch))
    assert all(torch.equal(ours[key], theirs[key]) for key in batch)
    emb = torch.arange(12.0)[:, None, None, None]  # rotary angle rows: one per global position
    rows = get_pos_emb_on_this_cp_rank(emb, 0, parallel_state.get_context_parallel_group()).flatten()
    assert rows.tolist() == ours["tokens"][0].tolist()


def _packed_sft_batch(seq: int = 48):
    """Two packed rows: conversations of different lengths (multiples of 4), prompts and padding masked."""
    gen = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(256, (2, seq), generator=gen), "labels": torch.randint(256, (2, seq), generator=gen),
             "loss_mask": torch.zeros(2, seq), "position_ids": torch.zeros(2, seq, dtype=torch.long),
             "cu_seqlens": torch.full((2, seq + 1), seq, dtype=torch.int32)}
    for row, spans in enumerate([[(12, 5), (20, 9), (16, 3)], [(8, 2), (24, 10), (8, 7), (8, 1)]]):
        start, bounds = 0, [0]
        for length, prompt in spans:  # positions [start+prompt, start+length-2) carry loss
            batch["loss_mask"][row, start + prompt:start + length - 2] = 1.0
            batch["position_ids"][row, start:start + length] = torch.arange(length)
            start += length
            bounds.append(start)
        batch["cu_seqlens"][row, :len(bounds)] = torch.tensor(bounds, dtype=torch.int32)
    return batch


def _sft_step(cp: int):
    """(loss sum, token count, gradients) of forward_step at context parallel size ``cp``."""
    cfg = Config()
    cfg.model.vocab_size, cfg.parallel.cp = 256, cp
    init_model_parallel(cfg)
    model = build_model(cfg.model, to_transformer_config(cfg), seed=3)[0]
    cfg.stage.name = "sft"
    batch, packed_seq_params = prepare_micro_batch(_packed_sft_batch())  # the schedule's forward_step, unrolled
    output, loss_func = build_stage(cfg).forward_step(model, batch, packed_seq_params)
    loss_sum, count, _ = loss_func(output)
    loss_sum.backward()
    grads = [param.grad for param in model.parameters()]
    parallel_state.destroy_model_parallel()
    return loss_sum.detach(), count, grads


def _check_packed_sft(cp: int) -> None:
    ref_sum, ref_count, ref_grads = _sft_step(1)
    loss_sum, count, grads = _sft_step(cp)
    counts = [torch.zeros_like(count) for _ in range(cp)]
    torch.distributed.all_gather(counts, count)
    assert len(set(c.item() for c in counts)) > 1, counts  # the ranks hold different numbers of loss tokens
    for tensor in [loss_sum, count, *grads]:
        torch.distributed.all_reduce(tensor)
    assert count == ref_count and abs(loss_sum - ref_sum) <= 1e-6 * ref_sum, (loss_sum, ref_sum)
    worst = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads))
    assert worst <= 2e-6, worst
    print(f"packed sft: loss sum rel diff {abs(loss_sum - ref_sum).item() / ref_sum.item():.2e}, "
          f"worst grad rel diff {worst:.2e}")


def main() -> None:
    cpu_compat.install()
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(context_parallel_size=torch.distributed.get_world_size())
    cp, rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               num_query_groups=KV_HEADS, context_parallel_size=cp, attention_dropout=0.0,
                               params_dtype=torch.float64)
    attention = SDPAttention(config, 1, AttnMaskType.causal, "self")
    _check(attention, 24, 3, None, cp, rank)  # 24 positions: 6 per chunk at cp=2
    cu = torch.tensor([0, 8, 20, 24, 36], dtype=torch.int32)  # sub-sequences of 8, 12, 4, 12
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=12,
                             max_seqlen_kv=12)
    _check(attention, 36, 1, packed, cp, rank)
    _check_split_matches_megatron(cp, rank)
    parallel_state.destroy_model_parallel()
    _check_packed_sft(cp)
    torch.distributed.destroy_process_group()
    print("ok")


if __name__ == "__main__":
    main()
