"""MoE training metrics: auxiliary losses and expert load balance, per layer.

megatron-core records each router's load-balancing loss (and z-loss) in a module-level
tracker; the expert load is counted here by a forward hook on every router. Both are
reduced across all ranks in one all-reduce per log line, so every rank must call
:meth:`MoEMetrics.collect` at the same iterations (the trainer's log interval).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from megatron_qwen.config.params import moe_layer_pattern
from megatron_qwen.config.schema import Config
from megatron_qwen.platform import collectives

# megatron's tracker names; the load-balancing loss is stored divided by its coefficient.
_AUX, _Z = "load_balancing_loss", "z_loss"


def load_imbalance(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Max over mean tokens per expert along the last dim: 1.0 is a perfect balance,
    num_experts / topk means every token went to the same top-k experts."""
    tokens = tokens_per_expert.float()
    return tokens.max(dim=-1).values / tokens.mean(dim=-1).clamp(min=1e-9)


class MoEMetrics:
    """Accumulates router statistics between two log lines.

    Token counts are summed over the whole window (all steps and micro-batches since the
    last :meth:`collect`), so the imbalance is that of the window's total expert load. With
    ``moe_pad_to_capacity`` the count is the padded load, 1.0 by construction.
    """

    def __init__(self, chunks: List[torch.nn.Module], cfg: Config, device: torch.device) -> None:
        m = cfg.model
        self.moe_layers = [i for i, is_moe in enumerate(moe_layer_pattern(m)) if is_moe]
        self.report_aux = m.moe_aux_loss_coeff > 0
        self.report_z = bool(m.moe_z_loss_coeff)
        self.tokens = torch.zeros(m.num_layers, m.num_experts, device=device)  # [L, E] routed tokens
        self.calls = torch.zeros(m.num_layers, device=device)  # [L] router forwards (micro-batches)
        routers = [mod for chunk in chunks for mod in chunk.modules() if isinstance(mod, TopKRouter)]
        self.handles = [router.register_forward_hook(self._count) for router in routers]

    def _count(self, router: TopKRouter, inputs: tuple, output: tuple) -> None:
        # Only training forwards, as for megatron's aux-loss tracker. NOTE: activation
        # recompute replays the forward and counts it twice here and in the tracker alike;
        # the per-call mean and the max/mean ratio are unaffected.
        if not (router.training and torch.is_grad_enabled()):
            return
        _, routing_map = output  # [tokens, E] bool, after any token dropping
        layer = router.layer_number - 1
        self.tokens[layer] += routing_map.sum(dim=0).to(self.tokens.dtype)
        self.calls[layer] += 1

    def _tracked(self, name: str) -> torch.Tensor:
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        if name not in tracker:
            return torch.zeros_like(self.calls)
        return tracker[name]["values"][: self.calls.numel()].to(self.calls)  # [L]

    def collect(self) -> Dict[str, float]:
        """Reduces and resets the window's statistics; call on every rank.

        Returns ``moe_aux_loss`` (load-balancing loss / its coefficient, mean over MoE layers
        and micro-batches; 1.0 when balanced), ``moe_z_loss`` when enabled, and the load
        imbalance (max/mean tokens per expert): mean and worst over layers and per layer.
        """
        packed = torch.cat([self.tokens.flatten(), self.calls, self._tracked(_AUX), self._tracked(_Z)])
        collectives.all_reduce(packed)  # sums over every rank of every stage
        layers, experts = self.tokens.shape
        tokens = packed[: layers * experts].view(layers, experts)
        calls, aux, z = packed[layers * experts:].view(3, layers).unbind()
        self.tokens.zero_()
        self.calls.zero_()
        moe_utils.clear_aux_losses_tracker()
        return self._summarize(tokens, calls, aux, z)

    def _summarize(self, tokens: torch.Tensor, calls: torch.Tensor, aux: torch.Tensor,
                   z: torch.Tensor) -> Dict[str, float]:
        idx = [i for i in self.moe_layers if calls[i] > 0]
        if not idx:
            return {}
        calls = calls[idx]
        imbalance = load_imbalance(tokens[idx])  # [moe layers]
        record: Dict[str, float] = {}
        if self.report_aux:
            # Each rank of a TP/CP group tracks its partial aux loss (sequence parallel),
            # so the world sum holds tp*cp partial copies per full value and call count.
            tp_cp = (parallel_state.get_tensor_model_parallel_world_size()
                     * parallel_state.get_context_parallel_world_size())
            record["moe_aux_loss"] = float((aux[idx] * tp_cp / calls).mean())
        if self.report_z:
            record["moe_z_loss"] = float((z[idx] / calls).mean())  # z-loss is a per-rank mean
        record["moe_imbalance"] = float(imbalance.mean())
        record["moe_imbalance_max"] = float(imbalance.max())
        record.update({f"moe_imbalance_layer_{i}": float(v) for i, v in zip(idx, imbalance)})
        return record

    def close(self) -> None:
        """Removes the router hooks."""
        for handle in self.handles:
            handle.remove()


def build_moe_metrics(cfg: Config, chunks: List[torch.nn.Module],
                      device: torch.device) -> Optional[MoEMetrics]:
    """MoE metrics for an MoE model, None for a dense one."""
    return MoEMetrics(chunks, cfg, device) if cfg.model.num_experts is not None else None


def format_moe(record: Dict[str, float]) -> str:
    """Console suffix: aux loss and load imbalance (empty for a dense model)."""
    if "moe_imbalance" not in record:
        return ""
    parts = [f" | moe imbalance {record['moe_imbalance']:.2f} (max {record['moe_imbalance_max']:.2f})"]
    if "moe_aux_loss" in record:
        parts.append(f" | aux {record['moe_aux_loss']:.3f}")
    if "moe_z_loss" in record:
        parts.append(f" | z {record['moe_z_loss']:.3f}")
    return "".join(parts)
