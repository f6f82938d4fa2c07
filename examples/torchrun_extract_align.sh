#!/usr/bin/env bash
# One node, N GPUs: extract with one process per GPU (each rank writes its shard of the
# blocks: torchrun's RANK / WORLD_SIZE stand in for --shard, LOCAL_RANK picks the GPU), then
# train FMbSeg's alignment module data-parallel (DDP: nccl on GPUs, gloo on CPUs).
#
#   NPROC=4 STORE=cs.zarr DATA_ROOT=data bash examples/torchrun_extract_align.sh
set -euo pipefail

NPROC=${NPROC:-2}
STORE=${STORE:-coco.zarr}
DATASET=${DATASET:-coco_stuff171}
DATA_ROOT=${DATA_ROOT:-data}
SPLIT=${SPLIT:-train}
MODEL=${MODEL:-dinov2-l14}
OUT=${OUT:-ck}
DEVICE=${DEVICE:-auto}          # auto: the GPU of LOCAL_RANK, else the CPU
EXTRACT_ARGS=${EXTRACT_ARGS:-}  # e.g. "--random-init --arch-override depth=2" (smoke test)
ALIGN_ARGS=${ALIGN_ARGS:-}      # trainer options, e.g. "--epochs 10 --batch-images 5"
TORCHRUN=${TORCHRUN:-torchrun}

# shellcheck disable=SC2086  # *_ARGS hold several words
$TORCHRUN --standalone --nproc-per-node "$NPROC" -m ovss_cli.main extract \
  --store "$STORE" --dataset "$DATASET" --data-root "$DATA_ROOT" --split "$SPLIT" \
  --model "$MODEL" --device "$DEVICE" -q $EXTRACT_ARGS

# Every rank reads its share of each step's images; rank 0 writes $OUT/last.pt.
# shellcheck disable=SC2086
$TORCHRUN --standalone --nproc-per-node "$NPROC" -m ovss_cli.main align \
  --store "$STORE" --features "$MODEL" --gt-dataset "$DATASET" --data-root "$DATA_ROOT" \
  --split "$SPLIT" --out "$OUT" --device "$DEVICE" -q $ALIGN_ARGS
