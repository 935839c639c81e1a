#!/bin/sh
# Trains cfgengine/assets/default-distilled.safetensors: the shipped `default` model distilled into
# a w-embedded student (guidance distillation, stage one) on one CPU thread. Resumable: rerun with
# `cfgengine distill --resume runs/default-distilled/student.ckpt.pt [--iters N]`.
set -e
export OMP_NUM_THREADS=1
cfgengine distill --teacher default --out runs/default-distilled/student.safetensors \
    --w-max 4 --iters "${ITERS:-2200}" --batch 32 --lr 2e-4 --warmup 100 --ema-decay 0.995 \
    --ckpt-every 100 --seed 0 --device cpu "$@"
cp runs/default-distilled/student.safetensors cfgengine/assets/default-distilled.safetensors
