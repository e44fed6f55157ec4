#!/usr/bin/env bash
# Re-record benchmarks/results on this machine (CPU). Each step stays under ~8 minutes on 2 cores.
# Builds go to $WORK (default /tmp/latentrt-bench); only reports land in benchmarks/results.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/latentrt-bench}
OUT=benchmarks/results
mkdir -p "$WORK" "$OUT/midsize-int8"

# (a) tiny built-in models: SD 1.x (with sweeps) and SDXL
latentrt bench tiny:sd1 -o "$OUT/tiny-sd1" --build-dir "$WORK/tiny-sd1" \
    --backends reference,torch,onnxruntime --precision int8 --steps 10 --warmup 1 --runs 3 \
    --sweep steps=1,4 --sweep size=256x256,512x512 --sweep batch=1,2
latentrt bench tiny:sdxl -o "$OUT/tiny-sdxl" --build-dir "$WORK/tiny-sdxl" \
    --backends reference,onnxruntime --precision int8 --steps 10 --size 512x512 --warmup 1 --runs 3

# (b) mid-size SD 1.5 topology (142M-parameter UNet) at 256x256
python -m benchmarks.midsize "$WORK/midsize"
latentrt bench "$WORK/midsize" -o "$OUT/midsize" --build-dir "$WORK/midsize-build" \
    --backends reference,onnxruntime --precision int8 --size 256x256 --steps 10 --warmup 1 --runs 5 \
    --sweep steps=1,4
latentrt bench "$WORK/midsize-build/onnx" -o "$OUT/midsize-sweeps" --build-dir "$WORK/midsize-build-2" \
    --backends reference,onnxruntime --precision int8 --size 256x256 --steps 2 --warmup 1 --runs 3 \
    --sweep size=128x128,256x256,384x384 --sweep batch=1,2

# int8 recipes on the mid-size UNet (speed, UNet error, final-image cost)
python -m benchmarks.int8_variants "$WORK/midsize-build/engines-onnxruntime" -o "$WORK/int8-variants" \
    --size 256x256 --steps 10 --runs 8
cp "$WORK/int8-variants/int8-variants.json" "$WORK/int8-variants/int8-variants.md" "$OUT/midsize-int8/"
