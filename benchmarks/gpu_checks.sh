#!/usr/bin/env bash
# The GPU checks of one session, in one go (a GPU is lent for minutes, not hours). Each part has its own
# time limit so that one slow part cannot starve the others; everything is logged under $OUT (default
# ./gpu_out). Needs: a CUDA GPU, torch, timm; the CIFAR-10 JPEG archives in $DATA (default
# ../shared/data/cifar10) and a copy of the official RIDE repository in $OFFICIAL (optional).
#
#   OUT=gpu_out DATA=../shared/data/cifar10 OFFICIAL=/path/to/RIDE-LongTailRecognition bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
DATA=${DATA:-../shared/data/cifar10}
OFFICIAL=${OFFICIAL:-}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
    nvidia-smi -L
    python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/machine.txt"

# 1. The CUDA tests (graph steps against eager steps, the device-resident loader on the GPU).
timeout "${TESTS_S:-70}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py tests/test_data_loaders.py \
    2>&1 | tail -n 15 | tee "$OUT/tests.txt"

# 2. The CIFAR-10-LT speed run: the full 200-epoch recipe, end to end.
timeout "${SPEEDRUN_S:-300}" python3 benchmarks/cifar_lt_speedrun.py --data-dir "$DATA" --json "$OUT/speedrun.json" \
    2>&1 | tee "$OUT/speedrun.txt"

# 3. Throughput against the official code and timm's resnet50, in one process.
official_args=()
[ -n "$OFFICIAL" ] && official_args=(--official-dir "$OFFICIAL")
timeout "${THROUGHPUT_S:-200}" python3 benchmarks/throughput.py --device cuda "${official_args[@]}" \
    --models ride_resnet32_4e ride_resnet50_3e --fused-both --cuda-graph --seconds 0.4 --repeats 3 \
    --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt"
