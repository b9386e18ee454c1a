#!/bin/bash
# Tokenize a corpus across nodes: a SLURM job array, one task per shard of an input file list.
# Task i of N tokenizes every N-th file of LIST (files i, i+N, ...) with tools/preprocess_data.py
# into OUT/shard_<i>.{bin,idx}; a finished shard has OUT/shard_<i>.done (its token count) and is
# skipped when the array (or one task) runs again, so a failed or preempted task is simply rerun.
# N is the size of the first array submitted for OUT, kept in OUT/shards with LIST's checksum:
# rerunning some tasks (--array=2,5) keeps the sharding, and a changed LIST is refused.
# Every task that finishes rewrites OUT/blend.yaml, a data= preset of the finished shards with
# their token counts as weights (copy it to conf/data/<name>.yaml and train with data=<name>).
#
#   sbatch --array=0-99%20 slurm/preprocess.sh files.txt /shared/tokens/web          # 100 shards
#   sbatch --array=0-9 slurm/preprocess.sh files.txt /shared/tokens/sft --chat      # extra tool flags
#   sbatch --array=7 slurm/preprocess.sh files.txt /shared/tokens/web                # rerun shard 7
#
# LIST holds one JSONL / JSONL.gz / Parquet path per line. CONTAINER_IMAGE and PYTHON as in
# slurm/train.sbatch (the array task runs on the node it was given, inside the image if there is one).
#SBATCH --job-name=preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: sbatch --array=0-<shards - 1> slurm/preprocess.sh LIST OUT_DIR [preprocess_data.py flags]" >&2
  exit 2
fi
LIST=$1
OUT=$(realpath -m "$2")
shift 2
PYTHON="${PYTHON:-python}"
task=${SLURM_ARRAY_TASK_ID:-}
count=${SLURM_ARRAY_TASK_COUNT:-}
if [[ -z $task || -z $count ]]; then
  echo "error: run as a job array with indices 0..N-1 (sbatch --array=0-<N-1>); got task '$task' of '$count'" >&2
  exit 2
fi
[[ -f $LIST ]] || { echo "error: input list $LIST does not exist" >&2; exit 2; }
mkdir -p "$OUT"
# NOTE: SLURM_ARRAY_TASK_COUNT is the size of this submission, not the number of shards: a rerun of
# one task (--array=2) would cut the list into 1 shard. The first submission's count is kept.
list_sum=$(sha256sum <"$LIST" | cut -d' ' -f1)
if [[ ! -f $OUT/shards ]]; then
  echo "$count $list_sum" >"$OUT/shards.$task.tmp"
  # Atomic where hard links exist (the first task's wins; a submission's tasks agree anyway).
  ln "$OUT/shards.$task.tmp" "$OUT/shards" 2>/dev/null || [[ -f $OUT/shards ]] || mv "$OUT/shards.$task.tmp" "$OUT/shards"
  rm -f "$OUT/shards.$task.tmp"
fi
read -r shards planned_sum <"$OUT/shards"
if [[ $list_sum != "$planned_sum" ]]; then
  echo "error: $LIST changed since $OUT was sharded ($OUT/shards); restore the list or use a new OUT_DIR" >&2
  exit 2
fi
if [[ $task -ge $shards ]]; then
  echo "error: array index $task is not a shard of $OUT (the list is cut into $shards shards, 0..$((shards - 1)));" \
    "submit indices in that range" >&2
  exit 2
fi
prefix="$OUT/shard_$(printf %05d "$task")"

run=("$PYTHON")
CONTAINER_IMAGE="${CONTAINER_IMAGE:-$PWD/megatron_qwen.sqsh}"
if [[ "$CONTAINER_IMAGE" != none && ("$CONTAINER_IMAGE" == *"#"* || -f "$CONTAINER_IMAGE") ]]; then
  run=(srun --ntasks=1 --container-image="$CONTAINER_IMAGE" --container-workdir="$PWD"
       --container-mounts="$PWD:$PWD,$OUT:$OUT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}" "$PYTHON")
fi

if [[ -f "$prefix.done" ]]; then
  echo "shard $task of $shards: done already ($(cat "$prefix.done") tokens), skipped"
else
  mapfile -t files < <(grep -v '^[[:space:]]*$' "$LIST" | awk -v n="$shards" -v i="$task" '(NR - 1) % n == i')
  if [[ ${#files[@]} -eq 0 ]]; then
    echo "shard $task of $shards: no files (the list has fewer than $shards entries)"
    exit 0
  fi
  echo "shard $task of $shards: ${#files[@]} file(s) -> $prefix"
  rm -f "$prefix".tmp* # what a killed run of this shard's tool left (it writes under PREFIX.tmp<pid>)
  # NOTE: not `tee /dev/stderr`: on a job log that reopens the file and truncates it.
  output=$("${run[@]}" tools/preprocess_data.py --input "${files[@]}" --output-prefix "$prefix" \
    --workers "${SLURM_CPUS_PER_TASK:-1}" --quiet "$@")
  echo "$output"
  summary=$(tail -n 1 <<<"$output")
  # The tool's last line: "<prefix>: N documents | M tokens | ...".
  tokens=$(sed -n 's/^.*: [0-9,]* documents | \([0-9,]*\) tokens |.*$/\1/p' <<<"$summary" | tr -d ,)
  [[ -n $tokens ]] || { echo "error: no token count in the tool's summary '$summary'" >&2; exit 1; }
  # The marker is written last (atomically): a shard without it is rerun from scratch.
  echo "$tokens" > "$prefix.done.tmp"
  mv "$prefix.done.tmp" "$prefix.done"
fi

# The blend of every finished shard, rewritten by each task (atomically, last writer wins).
# NOTE: tasks finishing together race: one can list the markers before another's exists and rename
# its blend after the other's. A task rewrites until the markers it listed are still all there are
# after its rename, so the last rename lists every finished shard.
blend="$OUT/blend.yaml.$task.tmp"
while :; do
  listed=("$OUT"/shard_*.done)
  {
    echo "# Written by slurm/preprocess.sh: the finished shards of $OUT, weighted by their token counts."
    echo "name: $(basename "$OUT")"
    echo "type: indexed"
    echo "blend:"
    for done in "${listed[@]}"; do
      echo "  - {path: ${done%.done}, weight: $(cat "$done")}"
    done
  } >"$blend"
  mv "$blend" "$OUT/blend.yaml"
  now=("$OUT"/shard_*.done)
  [[ ${now[*]} == "${listed[*]}" ]] && break
done
