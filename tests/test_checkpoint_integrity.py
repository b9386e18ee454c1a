"""Checkpoint completeness, resume choice, pruning, metrics and skip records (one process)."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_qwen.config.schema import LossSpikeConfig, ModelConfig
from megatron_qwen.data.batches import MicroBatchSampler
from megatron_qwen.data.skips import SKIP_FILE, SkippedSamples
from megatron_qwen.training.checkpointing import ckpt_dirs, manifest
from megatron_qwen.training.checkpointing.checkpoint import CheckpointError, _read, check_model_shape
from megatron_qwen.training.metrics import drop_records_after
from megatron_qwen.training.resilience.guard import SpikeDetector
from tests.helpers import REPO


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    from megatron_qwen.platform.launch import detect_process_env, init_process_group

    init_process_group(detect_process_env({}))
    yield
    torch.distributed.destroy_process_group()


def _checkpoint(path: Path, manifest_too: bool = True) -> Path:
    """A torch_dist-shaped checkpoint: shards + .metadata, metadata.json, common.pt."""
    dcp.save({"w": torch.arange(4096.0), "b": torch.ones(100)}, checkpoint_id=str(path))
    (path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    torch.save({"iteration": 1}, path / "common.pt")
    if manifest_too:
        manifest.write_manifest(path)
    return path


def _shard(path: Path) -> Path:
    return next(path.glob("*.distcp"))


def _truncate(path: Path, size: int = 100) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_manifest_names_truncated_and_corrupt_files(tmp_path):
    ckpt = _checkpoint(tmp_path / "iter_0000001")
    assert manifest.verify(ckpt) is None
    shard = _shard(ckpt)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed: only the checksum sees it
    shard.write_bytes(bytes(data))
    assert manifest.check_sizes(ckpt) is None
    assert manifest.verify(ckpt) == f"{shard} does not match its checksum in manifest.json (corrupt)"
    _truncate(shard)
    assert manifest.check_sizes(ckpt).startswith(f"{shard} has 100 bytes but the manifest records")
    shard.unlink()
    assert manifest.verify(ckpt) == f"{shard} is missing"


def test_checkpoint_without_manifest_is_checked_against_torch_metadata(tmp_path):
    ckpt = _checkpoint(tmp_path / "iter_0000001", manifest_too=False)
    assert manifest.verify(ckpt) is None  # written before manifests: complete
    _truncate(_shard(ckpt))
    assert ".metadata needs at least" in manifest.check_sizes(ckpt)
    (ckpt / "metadata.json").unlink()
    assert manifest.check_sizes(ckpt) == f"{ckpt / 'metadata.json'} is missing (no manifest.json either)"


def test_checksum_work_is_split_by_size_over_ranks():
    sizes = {f"f{i}": size for i, size in enumerate([90, 50, 40, 30, 10, 10, 5])}
    shares = [manifest._share(sizes, rank, 3) for rank in range(3)]
    assert sorted(sum(shares, [])) == sorted(sizes)  # disjoint and complete
    loads = sorted(sum(sizes[n] for n in share) for share in shares)
    assert loads == [70, 75, 90]  # largest file first, each to the least-loaded rank


def test_writer_records_replace_the_re_read_unless_their_file_changed(tmp_path):
    ckpt = _checkpoint(tmp_path / "iter_0000001", manifest_too=False)
    shards = sorted(ckpt.glob("*.distcp"))
    manifest.record_checksums(ckpt, shards, rank=0)
    with open(shards[0], "ab") as f:
        f.write(b"x")  # changed after its writer recorded it: checksummed again at publish
    manifest.write_manifest(ckpt)
    assert manifest.verify(ckpt) is None
    assert sorted(manifest.read_manifest(ckpt)) == sorted(p.name for p in ckpt.iterdir() if p.name != "manifest.json")
    manifest.record_checksums(ckpt, shards, rank=0)
    record = next(ckpt.glob(".checksums_*"))
    record.write_text(record.read_text()[:-5])  # cut short by a crash of the writer: not trusted
    manifest.write_manifest(ckpt)
    assert manifest.verify(ckpt) is None and not record.exists()


HOLD_S = 60  # how long the held checksums wait for their release at most


def _held_crc(gate: Path, crc, path: Path) -> int:
    """crc32_file that announces itself and waits until the test releases it."""
    (gate / f"entered_{os.getpid()}").touch()
    deadline = time.monotonic() + HOLD_S
    while not (gate / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return crc(path)


def _wait_for(condition, what: str, seconds: float = HOLD_S) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _async_save_with_held_checksums(rank: int, job: tuple) -> None:
    import functools

    from megatron_qwen.config.schema import Config
    from megatron_qwen.config.translate import to_transformer_config
    from megatron_qwen.convert.verify_worker import join_process_group
    from megatron_qwen.model.build import build_model
    from megatron_qwen.platform.parallel import destroy, init_model_parallel
    from megatron_qwen.training.checkpointing.checkpoint import TrainState
    from megatron_qwen.training.checkpointing.saver import CheckpointSaver
    from megatron_qwen.training.optim import build_optimizer, build_scheduler, wrap_model

    port, gate, root = job
    join_process_group(rank, 1, port, threads=1)
    try:
        cfg = Config(model=ModelConfig(vocab_size=64))
        cfg.parallel.dp, cfg.optim.warmup_iters = 1, 0
        init_model_parallel(cfg)
        model = wrap_model(cfg, build_model(cfg.model, to_transformer_config(cfg), cfg.train.seed))
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer, 10)
        manifest.crc32_file = functools.partial(_held_crc, gate, manifest.crc32_file)
        saver = CheckpointSaver(root, keep_last=2, async_save=True)
        start = time.monotonic()
        saver.save(model, optimizer, scheduler, TrainState(iteration=3), "model: {}\n")
        assert time.monotonic() - start < HOLD_S / 2, "the save call waited for checksums"
        # Checksumming starts while the loop is outside the saver (training), not in a later poll.
        _wait_for(lambda: any(gate.glob("entered_*")), "checksumming to start without the loop")
        saver.poll()
        assert time.monotonic() - start < HOLD_S / 2, "a poll waited for checksums"
        assert not (root / "iter_0000003").exists(), "published before its checksums"
        assert str(os.getpid()) not in {p.name.split("_")[1] for p in gate.glob("entered_*")}
        (gate / "release").touch()
        saver.wait()
        final = root / "iter_0000003"
        assert (root / ckpt_dirs.LATEST_FILE).read_text() == "3" and not (root / "iter_0000003.tmp").exists()
        assert manifest.verify(final) is None
        listed = sorted(manifest.read_manifest(final))
        assert listed == sorted(p.name for p in final.iterdir() if p.name != "manifest.json")
        assert any(name.endswith(".distcp") for name in listed) and "run_config.yaml" in listed
        saver.close()
    finally:
        destroy()


@pytest.mark.distributed
def test_async_save_returns_while_its_checksums_are_computed_and_publishes_after(tmp_path):
    from megatron_qwen.convert.verify_worker import spawn_ranks
    from tests.helpers import free_port

    gate = tmp_path / "gate"
    gate.mkdir()
    spawn_ranks(_async_save_with_held_checksums, (free_port(), gate, tmp_path / "checkpoints"), 1,
                "held-checksum save")


def test_resume_takes_the_newest_complete_checkpoint_and_says_why(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for it in (2, 4, 6):
        _checkpoint(root / f"iter_{it:07d}")
    (root / "notes").mkdir()  # not a checkpoint directory: ignored
    _truncate(_shard(root / "iter_0000006"))
    bad = _shard(root / "iter_0000004")
    bad.write_bytes(bytes(b ^ 1 for b in bad.read_bytes()))
    with caplog.at_level(logging.INFO):
        assert ckpt_dirs.choose_resume(root) == root / "iter_0000002"
    assert "skipping newer checkpoint iter_0000006" in caplog.text and "truncated" in caplog.text
    assert "skipping newer checkpoint iter_0000004" in caplog.text and "checksum" in caplog.text
    assert ckpt_dirs.find_latest(root) == root / "iter_0000004"  # tools check sizes only
    assert ckpt_dirs.choose_resume(tmp_path / "empty") is None


def test_a_run_with_only_damaged_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    root = tmp_path / "checkpoints"
    _truncate(_shard(_checkpoint(root / "iter_0000003")))
    with pytest.raises(CheckpointError) as err:
        ckpt_dirs.choose_resume(root)
    message = str(err.value)
    assert "\n" not in message and str(root) in message and "none is complete" in message
    assert "checkpoint.load=" in message and "run_dir=" in message
    assert (root / "iter_0000003").is_dir()  # nothing removed


def test_prune_keeps_complete_checkpoints_and_newer_damaged_ones(tmp_path):
    root = tmp_path / "checkpoints"
    for it in (2, 4, 6, 8):
        _checkpoint(root / f"iter_{it:07d}")
    _truncate(_shard(root / "iter_0000006"))
    for it in (5, 9):
        (root / f"iter_{it:07d}.tmp").mkdir()
    ckpt_dirs.prune(root, keep_last=2, below=8)
    assert sorted(p.name for p in root.iterdir()) == ["iter_0000004", "iter_0000006", "iter_0000008",
                                                      "iter_0000009.tmp"]  # a save in flight keeps its .tmp
    _truncate(_shard(root / "iter_0000008"))
    ckpt_dirs.prune(root, keep_last=1, below=8)
    assert (root / "iter_0000004").is_dir()  # the only complete one


def test_checkpoint_load_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; point it at"):
        ckpt_dirs.resolve_load(tmp_path / "nowhere")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes is not a complete checkpoint: .*metadata.json is missing"):
        ckpt_dirs.resolve_load(tmp_path / "notes")
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints" / "iter_0000005")
    assert ckpt_dirs.resolve_load(run) == run / "checkpoints" / "iter_0000005"


def test_a_truncated_file_is_a_one_line_error_naming_the_checkpoint(tmp_path):
    from megatron.core import dist_checkpointing

    ckpt = _checkpoint(tmp_path / "iter_0000001", manifest_too=False)
    _truncate(ckpt / "common.pt", 50)
    with pytest.raises(CheckpointError) as err:
        _read(ckpt, "common.pt", dist_checkpointing.load_common_state_dict, str(ckpt))
    assert str(err.value).startswith(f"{ckpt}: reading common.pt failed (") and "\n" not in str(err.value)


def test_a_checkpoint_of_another_model_shape_is_named(tmp_path):
    (tmp_path / "run_config.yaml").write_text("model:\n  hidden_size: 128\n  num_layers: 4\n  name: x\n")
    with pytest.raises(CheckpointError, match=r"another model shape: hidden_size=128 \(this run: 64\)"):
        check_model_shape(tmp_path, ModelConfig(hidden_size=64, num_layers=4))
    check_model_shape(tmp_path, ModelConfig(hidden_size=128, num_layers=4))


def test_metrics_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    drop_records_after(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_skipped_batches_are_left_out_by_the_sampler(tmp_path):
    skips = SkippedSamples(8)
    skips.add_batch(tmp_path, 2, "test", write=True)
    loaded = SkippedSamples.load(tmp_path, 8)
    assert loaded.ranges == [(8, 8)] and json.loads((tmp_path / SKIP_FILE).read_text())["first_sample"] == 8
    assert [loaded.batch_skipped(s) for s in (7, 8, 15, 16)] == [False, True, True, False]
    batches = list(MicroBatchSampler(32, 0, 2, 1, 2, loaded.batch_skipped))  # DP rank 1 of 2
    assert batches == [[2, 3], [6, 7], [18, 19], [22, 23], [26, 27], [30, 31]]


def test_spike_detector_by_factor_and_zscore():
    det = SpikeDetector(LossSpikeConfig(action="warn", window=4, min_history=3, factor=1.5))
    assert [det.check(s, v) for s, v in enumerate([5.0, 4.0, 3.0], 1)] == [None] * 3
    assert det.check(4, 6.1) == "loss 6.1000 > 1.5 x running mean 4.0000"
    assert det.check(5, float("nan")) == "loss nan"
    det.forget_after(1)
    assert list(det.history) == [(1, 5.0)]
    det = SpikeDetector(LossSpikeConfig(action="warn", window=4, min_history=2, zscore=3.0))
    det.check(1, 4.0), det.check(2, 4.2)
    assert det.check(3, 4.3) is None and det.check(4, 4.9) is not None


CHILDREN = textwrap.dedent("""
    import multiprocessing, os, time
    from megatron_qwen.platform import orphans

    orphans.install()
    manager = orphans.spawned_manager()  # spawn context, like megatron's writer-results queue
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,))
    child.start()  # fork context, like megatron's writer processes
    print(manager._process.pid, child.pid, flush=True)
    time.sleep(600)
""")


def test_writer_like_children_die_with_a_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", CHILDREN], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
