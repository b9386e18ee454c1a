"""The process environment a parallel layout implies, decided in one place.

The values follow Megatron-Bridge's H100 performance recipes. Each trainer process applies
them at start (:func:`megatron_qwen.train.run`, before CUDA, NCCL or Transformer Engine read
them), so the SLURM templates carry no layout-dependent exports and a variable exported by the
user or by the site hook (``MEGATRON_QWEN_SITE_ENV``, slurm/train.sbatch) wins. The dry run
prints the same mapping. Pure: no torch.
"""

from __future__ import annotations

from typing import Dict

from megatron_qwen.config.schema import Config
from megatron_qwen.config.userbuffers import overlap_applies

P2P_NET_CHUNKSIZE = 2 * 1024 * 1024  # bytes; Bridge's 70B recipes, for PP sends between nodes
LAYERNORM_SM_MARGIN = 20  # SMs TE's norms leave to the communication kernels they overlap


def layout_env(cfg: Config, world_size: int) -> Dict[str, str]:
    """Environment variables for ``cfg``'s layout at ``world_size`` ranks.

    - ``CUDA_DEVICE_MAX_CONNECTIONS``: 1 when TP or CP > 1 (their communication kernels must be
      issued in order with the GEMMs they overlap; megatron requires it for sequence parallel),
      else 32 (more hardware queues let DP's bucketed collectives run beside compute).
    - ``NCCL_P2P_NET_CHUNKSIZE``: when the pipeline crosses nodes (PP is the outermost group, so
      any pp > 1 job on more than one node sends stage-to-stage over the network).
    - ``NVTE_{FWD,BWD}_LAYERNORM_SM_MARGIN``: with TP communication overlap.
    """
    p = cfg.parallel
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1" if p.tp > 1 or p.cp > 1 else "32"}
    if p.pp > 1 and world_size > cfg.cluster.gpus_per_node:
        env["NCCL_P2P_NET_CHUNKSIZE"] = str(P2P_NET_CHUNKSIZE)
    if overlap_applies(p):
        env["NVTE_FWD_LAYERNORM_SM_MARGIN"] = env["NVTE_BWD_LAYERNORM_SM_MARGIN"] = str(LAYERNORM_SM_MARGIN)
    return env


def format_env(env: Dict[str, str]) -> str:
    """The dry run's line: ``environment (per layout): K=V K=V``."""
    return "environment (per layout): " + " ".join(f"{k}={v}" for k, v in sorted(env.items()))
