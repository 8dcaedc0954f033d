#!/usr/bin/env bash
# Caption a collection on Slurm: a TASKS-way job array plus a merge job that runs after
# every task succeeded (--dependency=afterok). Prints the two job ids.
#
#   jobs/slurm/submit.sh INPUT OUT_DIR [TASKS]
#   GRES=gpu:1 MODEL=model.safetensors SBATCH_ARGS="--partition=gpu --time=04:00:00" \
#     jobs/slurm/submit.sh /data/photos /data/captions 16
#
# Output: OUT_DIR/part-I.$FORMAT per task, OUT_DIR/captions.$FORMAT merged (OUT to change),
# logs in LOG_DIR (default OUT_DIR/logs), appended across requeues.
#
# Parameters (environment variables, all optional):
#   TASKS          shards / array size when not given as the 3rd argument (default 4)
#   MODEL, FORMAT, BATCHCAP, EXTRA_ARGS   passed to caption-array.sbatch (see its header)
#   OUT, EXPECT_COUNT, EXPECT_LISTING     passed to merge.sbatch (see its header)
#   GRES           per-task generic resources for the caption tasks, e.g. gpu:1 (default none)
#   CPUS_PER_TASK  CPUs per caption task (--cpus-per-task); batchcap decodes with one worker per CPU
#                  but one. Default 16 when GRES asks for a GPU (a core decodes ~250 photos/s of
#                  500x375, so a GPU's ~3,000/s needs 12-16), else 1
#   MEM            memory per caption task (--mem), default (4 + CPUS_PER_TASK) GB: ~4 GB for the
#                  model, CUDA and the writer, and per CPU a decode worker (~0.5 GB with its batches
#                  in flight), doubled for headroom
#   ARRAY_LIMIT    at most this many tasks at once (sbatch --array=0-N%LIMIT)
#   SBATCH_ARGS    more sbatch options for both jobs, word-split (partition, time, account)
#   LOG_DIR        where Slurm writes the job logs (default OUT_DIR/logs)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ "$#" -lt 2 ] || [ "$#" -gt 3 ]; then
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
INPUT="$(realpath -m -- "$1")"
OUT_DIR="$(realpath -m -- "$2")"
TASKS="${3:-${TASKS:-4}}"
case "$TASKS" in ''|*[!0-9]*|0) echo "submit.sh: TASKS must be a positive integer, not '$TASKS'" >&2; exit 2 ;; esac
LOG_DIR="$(realpath -m -- "${LOG_DIR:-$OUT_DIR/logs}")"
mkdir -p "$OUT_DIR" "$LOG_DIR"
export INPUT OUT_DIR TASKS

# shellcheck disable=SC2206  # SBATCH_ARGS is word-split on purpose
common=(--parsable --chdir="$OUT_DIR" ${SBATCH_ARGS:-})
array="0-$((TASKS - 1))${ARRAY_LIMIT:+%$ARRAY_LIMIT}"
case "${GRES:-}" in *gpu*) default_cpus=16 ;; *) default_cpus=1 ;; esac
CPUS_PER_TASK="${CPUS_PER_TASK:-$default_cpus}"
case "$CPUS_PER_TASK" in ''|*[!0-9]*|0) echo "submit.sh: CPUS_PER_TASK must be a positive integer, not '$CPUS_PER_TASK'" >&2; exit 2 ;; esac
MEM="${MEM:-$((4 + CPUS_PER_TASK))G}"
caption_args=(--array="$array" --output="$LOG_DIR/caption-%A_%a.log" --cpus-per-task="$CPUS_PER_TASK" --mem="$MEM")
if [ -n "${GRES:-}" ]; then caption_args+=(--gres="$GRES"); fi

array_id="$(sbatch "${common[@]}" "${caption_args[@]}" "$here/caption-array.sbatch")"
array_id="${array_id%%;*}"
merge_id="$(sbatch "${common[@]}" --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
            --output="$LOG_DIR/merge-%j.log" "$here/merge.sbatch")"
merge_id="${merge_id%%;*}"
echo "array_job=$array_id merge_job=$merge_id tasks=$TASKS cpus_per_task=$CPUS_PER_TASK mem=$MEM" \
     "out_dir=$OUT_DIR logs=$LOG_DIR"
