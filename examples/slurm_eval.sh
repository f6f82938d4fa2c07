#!/usr/bin/env bash
# SLURM job queued by slurm_extract.sh (--dependency=afterok): checks the store the array
# filled, then evaluates on it. Also runs by hand: STORE=voc.zarr bash examples/slurm_eval.sh
#SBATCH --job-name=ovss-eval
#SBATCH --gres=gpu:1
#SBATCH --time=01:00:00
set -euo pipefail

OVSS=${OVSS:-ovss}
STORE=${STORE:-voc.zarr}
DATASET=${DATASET:-voc21}
DATA_ROOT=${DATA_ROOT:-data}
SPLIT=${SPLIT:-val}
EVAL_ARGS=${EVAL_ARGS:-}
RESULT=${RESULT:-eval-${SLURM_JOB_ID:-local}.json}

# Every block written by some shard, checksums intact (exit 1 otherwise: the job fails).
$OVSS store verify "$STORE"
# shellcheck disable=SC2086  # EVAL_ARGS holds several words
$OVSS eval --store "$STORE" --dataset "$DATASET" --data-root "$DATA_ROOT" --split "$SPLIT" \
  -q --json $EVAL_ARGS > "$RESULT"
echo "wrote $RESULT"
