"""The MFU denominator: GPU peaks by device name, FP8 doubling, CPU probes per dtype."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_qwen.config.schema import ClusterConfig, Config, PrecisionConfig
from megatron_qwen.training import metrics
from megatron_qwen.training.metrics import format_mfu, gpu_peak_tflops, peak_tflops, throughput


@pytest.mark.parametrize("name, bf16", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM5
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
])
def test_gpu_peak_by_device_name_and_doubled_for_fp8(name, bf16):
    assert gpu_peak_tflops(name) == bf16
    assert gpu_peak_tflops(name, fp8=True) == 2 * bf16


def test_unknown_gpu_has_no_peak_and_mfu_is_unavailable():
    assert gpu_peak_tflops("Tesla T4") is None
    record = throughput(tokens=1000, seconds=1.0, flops_per_token=1e9, world_size=1, peak=None)
    assert record["mfu"] is None and record["tflops_per_device"] == pytest.approx(1.0)
    assert format_mfu(record["mfu"]) == "n/a" and format_mfu(0.4567) == "45.7%"


def _cfg(dtype="bf16", fp8=None, peak=None) -> Config:
    return dataclasses.replace(Config(), precision=PrecisionConfig(dtype=dtype, fp8=fp8),
                               cluster=ClusterConfig(peak_tflops=peak))


def test_configured_peak_is_the_bf16_peak_and_counts_twice_for_fp8():
    assert peak_tflops(_cfg(peak=989.0)) == 989.0
    assert peak_tflops(_cfg(fp8="tensorwise", peak=989.0)) == 1978.0


def test_cpu_peak_is_measured_in_the_runs_own_dtype(monkeypatch):
    monkeypatch.setattr(metrics.torch.cuda, "is_available", lambda: False)
    probed = []
    monkeypatch.setattr(metrics, "measure_cpu_tflops", lambda dtype: probed.append(dtype) or 0.5)
    assert peak_tflops(_cfg("bf16")) == 0.5 and peak_tflops(_cfg("fp32")) == 0.5
    assert probed == ["bf16", "fp32"]


def test_cpu_probe_runs_a_matmul_of_that_dtype():
    fp32 = metrics.measure_cpu_tflops("fp32")
    bf16 = metrics.measure_cpu_tflops("bf16")
    assert fp32 > 0 and bf16 > 0
    assert metrics.measure_cpu_tflops.cache_info().currsize >= 2  # one cached probe per dtype
