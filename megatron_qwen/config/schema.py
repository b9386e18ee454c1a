"""Typed configuration schema.

Hydra composes ``conf/`` YAML against these dataclasses (registered in
:mod:`megatron_qwen.config.store`); YAML only holds what varies. Validation lives in
:mod:`megatron_qwen.config.validate`, translation to megatron-core objects in
:mod:`megatron_qwen.config.translate`. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class RopeScalingConfig:
    """YaRN rotary scaling (Qwen's documented way to serve beyond 32K tokens); HF ``rope_scaling``."""

    type: Optional[str] = None  # yarn (the only type supported); None = plain RoPE
    factor: Optional[float] = None  # context stretch, e.g. 4.0 (32K -> 128K)
    original_max_position_embeddings: Optional[int] = None  # the context trained without scaling


@dataclass
class ModelConfig:
    """Qwen2.5 / Qwen2-MoE shape. Architecture constants (GQA, QKV bias, SwiGLU,
    RMSNorm, RoPE) are fixed in code; only sizes vary per ``conf/model/*.yaml``."""

    name: str = "qwen2_5_tiny"
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2  # KV heads (GQA)
    kv_channels: Optional[int] = None  # head dim; None = hidden_size // num_attention_heads
    vocab_size: int = 151936  # padded embedding rows, exactly the HF config's vocab_size
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    init_method_std: float = 0.02
    # Qwen2.5 trains without dropout (HF attention_dropout 0.0); nonzero values are for
    # fine-tuning experiments and for testing that RNG state survives a resume.
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Qwen2-MoE (num_experts=None means dense).
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None  # per routed expert (HF moe_intermediate_size)
    moe_router_topk: int = 2  # HF num_experts_per_tok
    moe_shared_expert_ffn_hidden_size: Optional[int] = None  # HF shared_expert_intermediate_size
    moe_shared_expert_gate: bool = True  # sigmoid(x @ w) scales the shared expert's output
    moe_layer_freq: int = 1  # layer i (0-based) is MoE when (i + 1) % freq == 0 (HF decoder_sparse_step)
    moe_aux_loss_coeff: float = 0.001  # HF router_aux_loss_coef; 0 disables the aux loss
    moe_z_loss_coeff: Optional[float] = None
    moe_capacity_factor: Optional[float] = None  # None = no token dropping
    moe_token_drop_policy: str = "probs"  # probs | position: which tokens an over-full expert drops
    moe_pad_to_capacity: bool = False  # pad every expert to capacity (static shapes; needs a capacity factor)
    moe_norm_topk_prob: bool = False  # renormalize the top-k probabilities (Qwen2-MoE: no)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
    """Parallel layout. ``dp`` is derived from the world size when left None."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual (interleaved) stages per pipeline rank
    # Uneven pipelines (megatron's --decoder-first/last-pipeline-num-layers): layers on the
    # first / last stage; the other stages split the rest evenly. Lets e.g. 3 layers run at pp=2.
    pp_first_stage_layers: Optional[int] = None
    pp_last_stage_layers: Optional[int] = None
    # megatron's pipeline_model_parallel_layout: one '|'-separated entry per virtual stage (chunk by
    # chunk) of E (embedding), t (decoder layer), L (output layer + loss), with x*n / (...)*n repeats;
    # lets the stages holding the 152K-row embedding and output layer carry fewer decoder layers.
    pp_layout: Optional[str] = None
    cp: int = 1
    # Transformer Engine's context-parallel communication: p2p (ring) | all_gather | a2a.
    # None = p2p with TE; without TE the local attention always all-gathers K/V.
    cp_comm_type: Optional[str] = None
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallel; None = same as tp
    dp: Optional[int] = None
    sp: bool = False  # sequence parallel (requires tp > 1)
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    recompute: str = "none"  # none | selective | full
    recompute_num_layers: int = 1  # layers per recompute chunk for "full"
    # Overlap TP all-gather / reduce-scatter with the GEMMs through Transformer Engine's
    # userbuffers; takes effect only with tp > 1, sp and a TE that provides them.
    tp_comm_overlap: bool = False
    # Its userbuffer settings per GEMM (config/userbuffers.py): "auto" (Megatron-Bridge's tuned
    # H100 entry for this hidden size, TP and bf16/FP8, else TE's defaults), "te_default", or the
    # path of a YAML file as Megatron-LM's --tp-comm-overlap-cfg. Read only when the overlap applies.
    tp_comm_overlap_cfg: str = "auto"
    # Gradient bucket size in MiB of the gradient buffer (megatron counts parameters: the
    # translation divides by the reduce dtype's bytes); takes effect with overlap_grad_reduce.
    # None = megatron's default, max(40M, 1M x dp) parameters. Megatron-Bridge's recipes: 128.
    ddp_bucket_mb: Optional[float] = None
    # The first model chunk's parameter all-gather starts right after its optimizer step,
    # hiding it behind the other chunks' steps (megatron: distributed optimizer, overlap_param_gather
    # and the interleaved schedule only; not with distributed checkpoints: benchmark runs).
    overlap_param_gather_with_optimizer_step: bool = False
    # The output layer's weight-gradient GEMMs of the last stage wait for the pipeline flush,
    # filling its bubble (megatron: pp > 1 and apex's gradient-accumulation fusion).
    defer_embedding_wgrad: bool = False
    wgrad_deferral_limit: int = 0  # micro-batches whose wgrad is deferred; 0 = all


@dataclass
class OptimConfig:
    """AdamW with warmup and cosine / WSD / linear / constant decay."""

    name: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: Optional[int] = None  # None = a quarter of the decay length, at most 2000
    decay_style: str = "cosine"  # cosine | wsd | linear | constant
    lr_decay_iters: Optional[int] = None  # None = train_iters
    wsd_decay_iters: Optional[int] = None  # length of the final WSD decay phase
    wsd_decay_style: str = "linear"  # linear | cosine | exponential | minus_sqrt
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class PrecisionConfig:
    """Parameter/compute dtype and optional FP8 (Transformer Engine only)."""

    dtype: str = "fp32"  # fp32 | bf16 | fp16
    fp8: Optional[str] = None  # delayed | tensorwise | blockwise
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    grad_reduce_in_fp32: bool = True
    # Delayed / tensorwise FP8 keep the weights in FP8 and all-gather them in FP8 (with the
    # distributed optimizer), as Megatron-Bridge's FP8 recipes do; false keeps bf16 weights.
    fp8_param_gather: bool = True
    # Tensorwise (current) scaling keeps the first and last decoder layer in bf16 (Megatron-Bridge's
    # convergence recipe); false runs them in FP8 too, as Bridge's H100 throughput benchmarks do.
    fp8_first_last_layers_bf16: bool = True


@dataclass
class DataBlendEntry:
    path: str = ""
    weight: float = 1.0
    # The domain's name in per-domain validation metrics (val_loss/<name>); None = the path's
    # stem (its last component up to the first dot: "code", "wiki_text_document").
    name: Optional[str] = None

    @property
    def domain(self) -> str:
        """The name per-domain metrics use: ``name``, else the path's stem."""
        return self.name or self.path.replace("\\", "/").rstrip("/").split("/")[-1].split(".")[0]


@dataclass
class DataConfig:
    """Where tokens come from. ``mock`` is megatron's learnable mock dataset."""

    name: str = "mock"
    type: str = "mock"  # mock | indexed | sft | embedded | preference (stage=dpo) | prompts (stage=grpo)
    blend: List[DataBlendEntry] = field(default_factory=list)
    valid_blend: Optional[List[DataBlendEntry]] = None
    split: str = "98,1,1"
    tokenizer: Optional[str] = None  # HF tokenizer dir; None = Qwen2.5's (data/tokenizer.py)
    cache_dir: Optional[str] = None
    num_workers: int = 0  # DataLoader worker processes per model chunk (0 = load in the trainer)
    extra: Any = None  # stage-specific options (see conf/data)


@dataclass
class RewardEntry:
    """One term of GRPO's reward: ``weight`` x the registered reward ``name`` (training/stages/grpo/rewards.py)."""

    name: str = "exact_match"  # exact_match | math_verify | format
    weight: float = 1.0


@dataclass
class StageConfig:
    """What is trained: ``name`` picks the stage (the table in megatron_qwen/training/stages);
    the other fields configure DPO (stage=dpo, following trl's DPOConfig) and GRPO (stage=grpo,
    following trl's GRPOConfig; training/stages/grpo/stage.py)."""

    name: str = "pretrain"  # pretrain | long_context | sft | dpo | grpo
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo (length-normalized, as trl)
    beta: float = 0.1  # DPO: trl's beta (IPO: its tau); GRPO: the k3 KL coefficient (0 = no reference)
    label_smoothing: float = 0.0  # conservative DPO: the probability that a label is flipped (sigmoid only)
    sft_weight: float = 0.0  # weight of the NLL on chosen responses (trl loss_type=["sigmoid", "sft"])
    reference: str = "precompute"  # precompute (one pass, stored in the run dir) | model (a frozen copy)
    reference_load: Optional[str] = None  # reference weights; None = the stage's start (checkpoint.load)
    # GRPO: a step samples group_size completions for each of its global_batch_size prompts.
    group_size: int = 8  # completions per prompt (trl num_generations)
    max_new_tokens: int = 64  # completion length cap; prompt + completion must fit train.seq_length
    temperature: float = 1.0  # of the rollouts and of validation (its seeds fixed per prompt and completion)
    top_p: float = 1.0
    clip_low: float = 0.2  # the ratio is clipped to [1 - clip_low, 1 + clip_high] (trl epsilon, epsilon_high)
    clip_high: float = 0.2
    advantage_std: str = "unbiased"  # (r - mean) / (std + 1e-4) per group: unbiased (trl) | population | none
    aggregation: str = "token"  # token (mean over the batch's response tokens) | sequence (mean of sequence means)
    rewards: List[RewardEntry] = field(default_factory=lambda: [RewardEntry()])  # the first is the accuracy
    # One rollout every k steps covering the prompts of the next k global batches; each of the k
    # optimizer steps trains on one of them (old log-probs from the rollout's policy).
    updates_per_rollout: int = 1
    # GRPO: warn once when every group's rewards are equal (frac_reward_zero_std = 1: no gradient) for
    # this many steps; DPO: when validation reward accuracy stays at or below chance (0.5) this long.
    no_signal_warn_steps: int = 20
    # GRPO training passes: None = train.micro_batch_size prompts' groups per packed micro-batch; a
    # number = as many whole groups as fit that many tokens (verl's dynamic batch size).
    max_tokens_per_microbatch: Optional[int] = None


@dataclass
class LossSpikeConfig:
    """Loss-spike detection (opt-in: it needs each step's loss on the host, one device sync
    per step). A step's loss is a spike when it exceeds the mean of the last ``window``
    unskipped losses by ``factor`` times, or by ``zscore`` standard deviations."""

    action: str = "none"  # none | warn (log and count) | rollback (to the last checkpoint)
    window: int = 50
    min_history: int = 10  # steps of history before any step can be a spike
    factor: Optional[float] = None  # e.g. 1.5: loss > 1.5 x running mean
    zscore: Optional[float] = None  # e.g. 6: loss > mean + 6 std
    # On rollback: how many batches, ending with the spiking one, are skipped (their
    # sample ids go to <run_dir>/skipped_samples.jsonl); at most those since the checkpoint.
    skip_batches: int = 1
    max_rollbacks: int = 3  # then stop: the spikes do not come from a few bad batches


@dataclass
class TrainConfig:
    """Iteration, batch and evaluation arithmetic."""

    seed: int = 1234
    train_iters: Optional[int] = 300
    train_samples: Optional[int] = None
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seq_length: int = 128
    eval_interval: int = 50
    # Also validate before the first step of a fresh run (eval.jsonl step 0): the starting point of
    # the validation curve (trl eval_on_start, verl val_before_train).
    eval_at_start: bool = False
    eval_iters: int = 4
    # lm-eval tasks run on the training layout every eval_tasks_interval steps (and at the end),
    # logged as tasks/<task>/<metric> in eval.jsonl (megatron_qwen/evaluation/): names of the
    # shipped offline tasks (arith_choice, arith_gen, prose_ppl) or of lm-eval's registry.
    eval_tasks: List[str] = field(default_factory=list)
    eval_tasks_interval: Optional[int] = None  # required with eval_tasks
    eval_tasks_limit: Optional[int] = None  # documents per task (lm-eval's limit); None = all
    exit_interval: Optional[int] = None  # save and exit when iteration % exit_interval == 0
    dry_run: bool = False
    # World size a dry run validates for; None = the launcher's (srun, torchrun), 1 if none.
    dry_run_world_size: Optional[int] = None
    # Like dry_run, but lists the layouts (tp, pp, vpp, dp, micro batch, recompute) that fit
    # cluster.gpu_memory_gb at dry_run_world_size, fastest first by a simple step-time model.
    dry_run_search: bool = False
    # Kernel fusions (SwiGLU, cross-entropy, bias-dropout-add, and the TE/apex ones where those
    # import); false runs megatron's unfused reference code.
    fusions: bool = True
    manual_gc_interval: int = 0  # > 0: Python's GC only every N steps, on all ranks together
    exit_signal: str = "SIGUSR1"  # graceful save-and-exit signal (SIGTERM always is)
    # Steps between collective checks for a stop signal (each check is one host sync); keep
    # interval x step time well below the signal's lead time (SLURM --signal=USR1@N).
    stop_check_interval: int = 5
    # Hang watchdog (training/resilience/watchdog.py): a rank with no completed step within the allowance
    # dumps its stacks to run_dir/hang/rank_<r>.txt and exits 1. null = off.
    hang_timeout_s: Optional[float] = 1800.0  # between completed steps (evaluation and saves included)
    hang_startup_timeout_s: Optional[float] = 7200.0  # trainer start to the first completed step
    # Steps with a non-finite grad norm are skipped (no update, LR schedule not advanced);
    # after this many in a row the run saves a checkpoint and stops.
    max_skipped_consecutive: int = 5
    loss_spike: LossSpikeConfig = field(default_factory=LossSpikeConfig)


@dataclass
class CheckpointConfig:
    save_interval: Optional[int] = 100
    keep_last: int = 2
    load: Optional[str] = None  # initial weights (e.g. from tools/convert); run_dir wins
    save_at_end: bool = True
    # Write in a background process while training goes on (megatron's async dist_checkpointing).
    async_save: bool = False


@dataclass
class LoggingConfig:
    log_interval: int = 10
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "megatron_qwen"
    wandb_entity: Optional[str] = None
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class ClusterConfig:
    name: str = "local"
    # Dense bf16 peak TFLOP/s per device (H100 SXM 989); None = looked up from the device
    # name. FP8 runs count against twice this value.
    peak_tflops: Optional[float] = None
    backend: Optional[str] = None  # nccl | gloo; None = nccl on GPU, gloo on CPU
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # per device, for train.dry_run_search
    # A collective that waits longer than this fails the job (one crashed rank must not hold
    # the allocation); raise it when rank 0 builds large dataset indexes before others join.
    pg_timeout_minutes: float = 30.0
    # Aggregate write bandwidth of the checkpoint filesystem, GB/s: sizes the dry run's
    # suggested stop-signal lead time (--signal=USR1@N).
    checkpoint_write_gbps: float = 10.0
    # Refuse to start (one line naming what is missing) when Transformer Engine, apex's fused
    # gradient accumulation or, with parallel.tp_comm_overlap, TE's userbuffers do not import,
    # instead of training 1.5x-10x slower on the fallbacks; false accepts the slow path.
    require_fast_path: bool = False
    # Automatic requeues of a SLURM job that failed (a node failure, an NCCL timeout: any exit
    # but 0, 2 = bad input, and 75 = saved after a stop signal, which always requeues), counted
    # across attempts in <run_dir>/failure_requeues. The trainer writes the limit to
    # <run_dir>/max_requeues at start for slurm/train.sbatch to read.
    max_requeues: int = 0
    # A job spanning nodes checks at start which network NCCL uses between them (its INIT/NET log,
    # platform/nccl_transport.py) and refuses TCP sockets (NET/Socket: the fabric's variables or
    # devices are missing); true accepts sockets with a warning.
    allow_socket_transport: bool = False


@dataclass
class DebugConfig:
    """Fault injection for tests of the failure handling; leave empty in real runs."""

    nan_grad_at_steps: List[int] = field(default_factory=list)  # gradient NaN on global rank 0
    spike_batch_at_steps: List[int] = field(default_factory=list)  # batch of one repeated token


@dataclass
class Config:
    """Root config composed by Hydra from ``conf/config.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    run_dir: str = "runs/default"
