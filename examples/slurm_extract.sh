#!/usr/bin/env bash
# SLURM array job: each task extracts its share of the store's blocks (`--shard i/n`), so N
# GPUs fill one store together; a second job evaluates once every task has succeeded.
#
#   sbatch --array=0-3 examples/slurm_extract.sh     # 4 shards, then it queues the eval job
#
# Settings come from the environment (defaults below); STORE may be a local path on a shared
# file system or an object-storage URL (s3://bucket/voc.zarr, credentials from AWS_*).
#SBATCH --job-name=ovss-extract
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
set -euo pipefail

OVSS=${OVSS:-ovss}
STORE=${STORE:-voc.zarr}
DATASET=${DATASET:-voc21}
DATA_ROOT=${DATA_ROOT:-data}
SPLIT=${SPLIT:-val}
MODEL=${MODEL:-clip-b16}
EXTRA=${EXTRA:-}               # e.g. "--random-init --arch-override ..." for a smoke test
# EVAL_ARGS (e.g. "--method maskclip") reaches the eval job through --export=ALL.

# Shard i of n: SLURM numbers the array tasks 0..n-1 (run with --array=0-(n-1)).
i=${SLURM_ARRAY_TASK_ID:?run as an array job: sbatch --array=0-3 $0}
n=${SLURM_ARRAY_TASK_COUNT:?run as an array job}

# shellcheck disable=SC2086  # EXTRA holds several words
$OVSS extract --store "$STORE" --dataset "$DATASET" --data-root "$DATA_ROOT" --split "$SPLIT" \
  --model "$MODEL" --shard "$i/$n" -q $EXTRA

# Task 0 queues the evaluation, to start only when every task of this array succeeded
# (`afterok:<job>` on an array's job id waits for all of its tasks); OVSS_NO_SUBMIT=1 skips it.
if [[ "$i" == 0 && -z "${OVSS_NO_SUBMIT:-}" ]]; then
  sbatch --dependency="afterok:${SLURM_ARRAY_JOB_ID}" \
    --export="ALL,STORE=$STORE,DATASET=$DATASET,DATA_ROOT=$DATA_ROOT,SPLIT=$SPLIT" \
    "$(dirname "$0")/slurm_eval.sh"
fi
