"""Checkpoint loading rules that need no process group."""

from pathlib import Path

import pytest
import torch

from megatron_qwen.training.checkpointing.checkpoint import CheckpointError, load_model_state, synced_params


class _WithExtraState(torch.nn.Module):
    """Like Transformer Engine's modules: FP8 metadata lives in ``_extra_state``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.core_attention = _TEAttention()


class _TEAttention(torch.nn.Module):
    def get_extra_state(self):
        return torch.tensor([1.0])

    def set_extra_state(self, state) -> None:
        self.restored = state


def test_te_extra_state_may_be_missing_but_nothing_else():
    module = _WithExtraState()
    assert "core_attention._extra_state" in module.state_dict()  # torch expects it ...
    weights = {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    load_model_state(module, weights, Path("/ckpt"))  # ... but a sharded checkpoint lacks it: fine
    with pytest.raises(CheckpointError, match=r"/ckpt does not match this model \(missing: linear.bias; "
                                              r"unexpected: none\)"):
        load_model_state(module, {k: v for k, v in weights.items() if k != "linear.bias"}, Path("/ckpt"))
    with pytest.raises(CheckpointError, match="unexpected: decoder.extra.weight"):
        load_model_state(module, {**weights, "decoder.extra.weight": torch.zeros(1)}, Path("/ckpt"))


class _OverlapDDP:
    """Records what checkpoint saving does to a DDP chunk with overlap_param_gather."""

    def __init__(self, hooked: bool) -> None:
        self.use_forward_hook, self.calls = hooked, []

    def disable_forward_pre_hook(self, param_sync: bool = True) -> None:
        self.calls.append(("disable", param_sync))

    def enable_forward_pre_hook(self) -> None:
        self.calls.append(("enable",))


def test_params_are_gathered_around_a_save_and_hooks_restored_on_error():
    hooked, plain = _OverlapDDP(True), _OverlapDDP(False)
    with pytest.raises(RuntimeError):
        with synced_params([hooked, plain]):
            assert hooked.calls == [("disable", True)]  # forced all-gather before reading weights
            raise RuntimeError("save failed")
    assert hooked.calls == [("disable", True), ("enable",)]
    assert plain.calls == []
