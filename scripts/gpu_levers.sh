#!/usr/bin/env bash
# Issue 17's GPU figures, as one command for a lent GPU machine (about 8 minutes on an H200):
# ViT-B/16 at the largest batch that fits (powers of two from 256), CLIP and FLIP, bf16
# autocast, plain and with gradient checkpointing, then each compiled; then bf16 weights with
# float32 masters (run.precision=bf16) for CLIP. samples/s per GPU and MFU, FLOPs counted by
# torch's FlopCounterMode (benchmarks/bench_levers.py says how). Wheels as for gpu_check.sh
# (.whl/, installed into /tmp/site). Results go to $OUT (or ./gpu_out) as gpu_levers.log.
source "$(dirname "$0")/gpu_env.sh" gpu_levers.log
nvidia-smi -L
common=(--device cuda --arch ViT-B-16 --batch-size 256 --find-max-batch --max-batch 16384 --steps 10
        --warmup 3 --threads 8)
timeout 300 python3 -m benchmarks.bench_levers "${common[@]}" --precision amp_bf16 --methods clip,flip \
    --variants plain,grad_checkpointing
timeout 150 python3 -m benchmarks.bench_levers "${common[@]}" --precision amp_bf16 --methods clip \
    --variants plain,compile,compile+grad_checkpointing
timeout 90 python3 -m benchmarks.bench_levers "${common[@]}" --precision bf16 --methods clip --variants plain
