"""Local (non-Transformer-Engine) layers for the Qwen2.5 spec.

megatron-core's local spec uses a torch norm that refuses sequence parallel and a
``DotProductAttention`` that builds its causal mask on CUDA and refuses context parallel.
These two modules replace them on every device: an RMSNorm numerically identical to
Hugging Face's ``Qwen2RMSNorm`` that marks its weight for the sequence-parallel grad
all-reduce, and a core attention on ``torch.nn.functional.scaled_dot_product_attention``
(FlashAttention kernels on H100 in bf16 through PyTorch, the math kernel on CPU) with
packed rows and context parallelism (:mod:`megatron_qwen.model.cp_attention`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_qwen.model.cp_attention import attention_view, gather_in_natural_order


class RMSNorm(torch.nn.Module):
    """Qwen2 RMSNorm: normalize in fp32, cast back, then scale (as transformers does)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # NOTE: with sequence parallel each TP rank sees a different slice of the sequence,
        # so the norm's grad is partial; finalize_model_grads all-reduces weights that carry
        # this flag across the TP group.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [s, b, h]
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SDPAttention(MegatronModule):
    """Core attention on PyTorch SDPA with GQA; drop-in for megatron's DotProductAttention.

    Packed rows attend within their sub-sequences; under context parallelism K and V are
    all-gathered over the CP group (``cp_comm_type`` is Transformer Engine's setting: this
    module always all-gathers).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        self.cp_group = None
        if config.context_parallel_size > 1:
            if attn_mask_type != AttnMaskType.causal:
                raise ValueError(f"SDPAttention implements context parallel for causal attention only, "
                                 f"not {attn_mask_type.name}")
            self.cp_group = (pg_collection.cp if pg_collection is not None
                             else parallel_state.get_context_parallel_group())
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,  # [sq, b, np, hn]
        key: torch.Tensor,  # [sk, b, ng, hn]
        value: torch.Tensor,  # [sk, b, ng, hn]
        attention_mask: Optional[torch.Tensor],  # megatron convention: True = masked out
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support an attention bias")
        if query.dim() == 3:  # THD (packed): megatron squeezed the batch dim, [t, np, hn]
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        sq, b, heads, hn = query.shape
        key, value, mask = self._keys_values_and_mask(query, key, value, attention_mask, packed_seq_params)
        causal = mask is None and (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        out = _sdpa(q, k, v, mask, causal, self.dropout if self.training else 0.0, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)  # [sq, b, np*hn]

    def _keys_values_and_mask(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: Optional[torch.Tensor], packed: Optional[PackedSeqParams]):
        """K/V [S, b, ng, hn] (all-gathered under CP) and the mask (None: plain causal).

        An explicit ``attention_mask`` (True = masked out; split along queries under CP, keys
        global) wins over the causal view, except for packed rows.
        """
        mask = None if attention_mask is None else ~attention_mask
        if self.cp_group is None and packed is None:
            return key, value, mask
        view = attention_view(query.shape[0], self.cp_group, packed, query.device, query.dtype)
        if self.cp_group is not None:
            key = gather_in_natural_order(key, self.cp_group, view)
            value = gather_in_natural_order(value, self.cp_group, view)
        return key, value, view.mask if mask is None or packed is not None else mask


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
          dropout: float, scale: Optional[float]) -> torch.Tensor:
    """SDPA on [b, heads, s, hn] with GQA (k/v may have fewer heads than q)."""
    heads = q.shape[1]
    gqa = k.shape[1] != heads
    if gqa and mask is not None and q.is_cuda:
        # NOTE: on CUDA only the flash and math kernels take GQA, and flash takes no mask: the
        # math kernel would materialize [b, heads, sq, sk] scores. Repeated KV heads let the
        # memory-efficient kernel run instead (the CPU kernels take GQA with a mask).
        k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                          scale=scale, enable_gqa=gqa)  # [b, heads, sq, hn]
