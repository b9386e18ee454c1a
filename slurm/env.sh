# shellcheck shell=bash
# Sourced, in the batch script on the job's first node, by slurm/train.sbatch and by the sweep
# launchers' `setup` (conf/hydra/launcher/slurm_*.yaml): the environment every trainer task gets,
# the rendezvous, the container, and the requeue protocol, in one place. Run from the repository
# root (jobs run in the submit directory). Sets PYTHON, RESUMABLE_EXIT_CODE, srun_args (fail fast,
# and the pyxis flags when there is an image) and launch (a description); defines requeue_after_exit
# and submitit_srun.

RESUMABLE_EXIT_CODE=75 # megatron_qwen.training.resilience.signals.RESUMABLE_EXIT_CODE
PYTHON="${PYTHON:-python}"
# Image built from slurm/container/Dockerfile (docs/slurm.md); "none" runs $PYTHON on the host.
CONTAINER_IMAGE="${CONTAINER_IMAGE:-$PWD/megatron_qwen.sqsh}"
# After the first task ends, srun waits this long for the others, then kills them. A clean
# stop (exit 75 after a collective save) ends all tasks within seconds of each other.
FAIL_FAST_SECONDS="${FAIL_FAST_SECONDS:-120}"

# Rendezvous: the first node of the allocation and a port derived from the job id, decided
# here on the batch host (outside any container: scontrol is not in the image).
MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

# Since Slurm 22.05 srun no longer inherits --cpus-per-task from the allocation: without this
# every rank (its data workers, its OpenMP threads) would share a single core.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# As in Megatron-Bridge's H100 recipes. What depends on the layout (CUDA_DEVICE_MAX_CONNECTIONS,
# NCCL_P2P_NET_CHUNKSIZE, NVTE_*_SM_MARGIN) is not exported here: each trainer sets it from the
# resolved config (megatron_qwen/config/environment.py; `train.dry_run=true` prints it), unless
# exported already (by you or the site hook below).
# Frees the memory of asynchronous collectives without recordStream (less fragmentation).
export TORCH_NCCL_AVOID_RECORD_STREAMS=1
# NCCL's kernels on a high-priority stream, ahead of the compute they overlap with.
export TORCH_NCCL_HIGH_PRIORITY=1
# Growable allocator segments (less fragmentation over long runs); NCCL's NVLink SHARP and
# CUDA-graph buffer registration stay off, as they do not mix with this allocator.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export NCCL_NVLS_ENABLE=0
export NCCL_GRAPH_REGISTER=0
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Site hook: a bash file exporting the fabric's settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, EFA/RoCE
# variables, ...), sourced here so that no template needs editing per cluster.
if [[ -n "${MEGATRON_QWEN_SITE_ENV:-}" ]]; then
  # shellcheck source=/dev/null
  source "$MEGATRON_QWEN_SITE_ENV" || { echo "error: MEGATRON_QWEN_SITE_ENV=$MEGATRON_QWEN_SITE_ENV failed to load; fix or unset it" >&2; exit 1; }
fi

# --kill-on-bad-exit stays 0: the ranks exit 75 one after another after a stop signal, and
# with 1 the first one would get the others killed (srun would then report 143, not 75).
srun_args=(--kill-on-bad-exit=0 --wait="$FAIL_FAST_SECONDS")
launch="host ($PYTHON)"
if [[ "$CONTAINER_IMAGE" != none && ("$CONTAINER_IMAGE" == *"#"* || -f "$CONTAINER_IMAGE") ]]; then
  # The repository (code, runs, the default dataset cache .cache/) and a cache elsewhere.
  mounts="$PWD:$PWD"
  if [[ -n "${MEGATRON_QWEN_CACHE:-}" ]]; then
    mkdir -p "$MEGATRON_QWEN_CACHE" && mounts+=",$MEGATRON_QWEN_CACHE:$MEGATRON_QWEN_CACHE"
  fi
  mounts+="${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}" # data blends, checkpoints to load, ...
  srun_args+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts" --container-workdir="$PWD")
  launch="container $CONTAINER_IMAGE"
fi

# The requeue protocol: `requeue_after_exit <trainers' exit status (srun's)> [run dir]`. Exit 75 (a
# checkpoint saved after a stop signal) requeues the job, which resumes where it stopped. With a
# run dir, a failure (node loss, NCCL timeout, a crash; not 2 = bad input) requeues at most
# cluster.max_requeues times over all attempts: the trainer wrote the limit into
# <run dir>/max_requeues, the count of failure requeues so far is kept next to it. Ends the script.
requeue_after_exit() {
  local status=$1 run_dir=${2:-} max_requeues failures
  if [[ $status -eq $RESUMABLE_EXIT_CODE ]]; then
    echo "[$(date -Is)] the trainer saved a checkpoint after a stop signal: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
  fi
  if [[ $status -ne 0 && $status -ne 2 && -n "$run_dir" && -f "$run_dir/max_requeues" ]]; then
    max_requeues=$(cat "$run_dir/max_requeues")
    failures=$(cat "$run_dir/failure_requeues" 2>/dev/null || echo 0)
    if (( failures < max_requeues )); then
      echo "[$(date -Is)] job $SLURM_JOB_ID failed (exit $status): requeue $((failures + 1)) of $max_requeues"
      echo $((failures + 1)) > "$run_dir/failure_requeues"
      scontrol requeue "$SLURM_JOB_ID" && exit 0
    fi
    if (( max_requeues > 0 )); then
      echo "[$(date -Is)] job $SLURM_JOB_ID failed (exit $status): its $max_requeues automatic requeue(s) (cluster.max_requeues) are spent"
    fi
  fi
  exit "$status"
}

# hydra-submitit-launcher writes its own step, `srun --unbuffered --output O --error E <python> -u -m
# submitit.core._submit <folder>`, and its 1.2 schema has no place for srun flags or a teardown: the
# launchers' setup defines `srun() { submitit_srun "$@"; }`, which adds srun_args, runs the
# image's $PYTHON in the container (the submitting host's interpreter, which submitit names, is not
# in the image), and applies the requeue protocol to the trainers' exit status: a saved stop (75)
# requeues; failures do not (the point's run dir, where its requeue limit is, is Hydra's choice).
submitit_srun() {
  local step=("$@")
  if [[ $# -lt 5 || "${step[$# - 2]}" != submitit.core._submit ]]; then
    echo "error: submitit_srun expects submitit's step (... <python> -u -m submitit.core._submit <folder>), got: $*" >&2
    exit 1
  fi
  if [[ $launch == container* ]]; then
    step[$# - 5]="$PYTHON" # the word before `-u -m submitit.core._submit <folder>`
  fi
  command srun "${srun_args[@]}" "${step[@]}"
  requeue_after_exit $?
}
