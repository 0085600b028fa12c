#!/usr/bin/env bash
# The GPU checks of a session, in one go (a GPU is lent for minutes, not hours). Each part has its own
# time limit so that one slow part cannot starve the others; everything is logged under $OUT (default
# ./gpu_out). Needs: a CUDA GPU, torch, timm; the CIFAR-10 JPEG archives in $DATA (default
# ../shared/data/cifar10) and a copy of the official RIDE repository in $OFFICIAL (optional).
#
#   OUT=gpu_out DATA=../shared/data/cifar10 OFFICIAL=/path/to/RIDE-LongTailRecognition bash benchmarks/gpu_checks.sh
#
# PARTS picks the parts and their order (default: all but r50_profile, epilogue, the two r50_compile parts
# and the two speed-run experiments, about 17 minutes on an H200 with every limit reached). A session's
# device time (15 minutes, start-up included; a start took about 90 s) does not cover them all. Measured on
# an H200: tests about 80 s (before the epilogue, --cuda-graph and --torchcompile tests), r32 and r50 about
# 60 s each, r50_profile 40 s, epilogue 30 s, a speed run 165 s; the compile parts have not run yet. By what
# they can decide, the next session's calls:
#   1. TESTS_K="not torchcompile" COMPILE_S=240 PARTS="tests epilogue r50 r50_compile_train" (about 7
#      minutes, timeout_s 540): the code paths never run on a GPU (cuDNN's fused epilogue, train.py
#      --cuda-graph; train.py --torchcompile is left out, a compilation of its own), whether the epilogue
#      brings routed ride_resnet50_3e up to timm's resnet50, and whether torch.compile brings its bf16
#      training to 2.5x the official fp32 step and 1.2x the official bf16 one;
#   2. with what is left (a speed run needs about 200 s): PARTS=speedrun_wide (whether full-width experts
#      at lr 0.05 reach 80 % within 3 minutes), then r32_profile if 60 s remain, else speedrun_fp32 or r32.
#      Every speed run also reports its accuracy with test-time flipping (an experiment beside the
#      recipe's evaluation).
#   tests           the CUDA tests: CUDA-graph training steps and routed inference against eager runs,
#                   the device-resident loader, inference (folded or not, fused or not, routed) and grad
#                   checkpointing against the CPU, cuDNN's fused epilogue against the step-by-step folding,
#                   train.py with fp16 autocast resumed, with --cuda-graph against eager, with --torchcompile,
#                   validate.py on CUDA; about 80 s before the last three tests were added, which bring a
#                   compilation (TESTS_K="not torchcompile" leaves it out)
#   train           train.py --cuda-graph for 2 epochs on the embedded digits (bf16, channels-last)
#   speedrun        the CIFAR-10-LT speed run, the default recipe (bf16, seed 0)
#   speedrun_seed1  the same with seed 1 (seed-to-seed spread of the accuracy), with the test accuracy
#                   every 20 epochs (where the accuracy is made: before or after deferred re-weighting)
#                   and the training loss every 2 (whether it settles after each learning-rate drop)
#   speedrun_fp32   the same in float32 (--amp none: what bf16 costs in accuracy), the same curves
#   speedrun_lr05   the recipe at lr 0.05 instead of 0.1, curves as above (an experiment away from the
#                   official recipe, advised for CIFAR-10-LT by the authors of SADE, built on the RIDE code);
#                   not in the default list
#   speedrun_wide   the same with full-width experts (reduce_dimension=False, more MACs); not in the default
#                   list
#   r32             throughput of ride_resnet32_4e (CUDA graphs for training and routed inference, the
#                   official code as shipped, inference also with batch norm not folded and without cuDNN's
#                   fused epilogue, where blocks run one by one unfold too); about 60 s
#   r50             throughput of ride_resnet50_3e and timm's resnet50 (inference also with batch norm not
#                   folded, and without cuDNN's fused epilogue); channels-last in fp32 too (the
#                   official code also as shipped, fp32 NCHW: the equal-precision target compares our
#                   fastest fp32 with it); about 60 s on an H200
#   r50_profile     ride_resnet50_3e inference and routed inference, bf16, the same variants and CUDA-graph
#                   routing, with a profile of every case (where the time goes); about 40 s
#   r32_profile     the speed run's training step (ride_resnet32_4e, batch 128, bf16, channels-last, eager and
#                   from a CUDA graph) with a profile of each: whether its 7 ms are the kernels' own time or
#                   gaps between them, and which kernels (what full-width experts would add); about 40 s
#   epilogue        benchmarks/conv_epilogue.py: bias, ReLU and residual add after a convolution, separately
#                   or in cuDNN's fused epilogue; about 30 s
#   r50_compile_train  ride_resnet50_3e training under torch.compile, bf16, channels-last, beside the official
#                   code (eager, bf16 channels-last and as shipped: fp32 NCHW); timm's resnet50 left out
#                   (another compilation): the two training targets, in the time one compilation takes
#   r50_compile     ride_resnet50_3e under torch.compile, bf16: training, all-experts and routed inference,
#                   beside the official code (eager: it has no such option) and timm's resnet50 (compiled
#                   too); not in the default list: minutes of compilation
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
DATA=${DATA:-../shared/data/cifar10}
OFFICIAL=${OFFICIAL:-}
PARTS=${PARTS:-tests train speedrun speedrun_seed1 speedrun_fp32 r32 r50}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
official_args=()
[ -n "$OFFICIAL" ] && official_args=(--official-dir "$OFFICIAL" --shipped-official)
{
    nvidia-smi -L
    python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
    git log -1 --format='code: %H %s' 2>/dev/null || true
} 2>&1 | tee "$OUT/machine.txt"

speedrun() {  # speedrun NAME [flags...]
    local name=$1
    shift
    timeout "${SPEEDRUN_S:-300}" python3 benchmarks/cifar_lt_speedrun.py --data-dir "$DATA" \
        --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.txt"
}

for part in $PARTS; do
    echo "=== $part ($(date -u +%H:%M:%S))"
    case $part in
    tests)
        CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout "${TESTS_S:-300}" python3 -m pytest -q -p no:cacheprovider \
            tests/test_cuda_graph.py tests/test_data_loaders.py tests/test_cuda.py --tb=short -k "${TESTS_K:-}" 2>&1 | tee "$OUT/tests.txt" | tail -n 40
        ;;
    train)
        timeout "${TRAIN_S:-90}" python3 train.py --model ride_resnet32_3e --epochs 2 --cuda-graph --amp \
            --amp-dtype bfloat16 --channels-last --output "$OUT/train_runs" 2>&1 | tail -n 20 | tee "$OUT/train.txt"
        ;;
    speedrun) speedrun speedrun ;;
    speedrun_seed1) speedrun speedrun_seed1 --seed 1 --eval-every 20 --log-every 2 ;;
    speedrun_fp32) speedrun speedrun_fp32 --amp none --eval-every 20 --log-every 2 ;;
    speedrun_lr05) speedrun speedrun_lr05 --lr 0.05 --eval-every 20 --log-every 2 ;;
    speedrun_wide) speedrun speedrun_wide --lr 0.05 --full-width --eval-every 20 --log-every 2 ;;
    r32)
        timeout "${THROUGHPUT_S:-200}" python3 benchmarks/throughput.py --device cuda "${official_args[@]}" \
            --models ride_resnet32_4e --fused-both --cuda-graph --unfolded --plain-epilogue --precision fp32 bf16 \
            --seconds 0.3 --repeats 3 --warmup 2 --json "$OUT/throughput_r32.json" 2>&1 | tee "$OUT/throughput_r32.txt"
        ;;
    r50)
        timeout "${THROUGHPUT_S:-200}" python3 benchmarks/throughput.py --device cuda "${official_args[@]}" \
            --models ride_resnet50_3e --unfolded --plain-epilogue --precision fp32 bf16 --channels-last \
            --seconds 0.2 --repeats 2 --warmup 1 --json "$OUT/throughput_r50.json" 2>&1 | tee "$OUT/throughput_r50.txt"
        ;;
    r50_profile)
        timeout "${THROUGHPUT_S:-200}" python3 benchmarks/throughput.py --device cuda "${official_args[@]}" \
            --models ride_resnet50_3e --modes infer routed --precision bf16 --channels-last --unfolded \
            --plain-epilogue --cuda-graph --profile 3 --seconds 0.2 --repeats 2 --warmup 1 \
            --json "$OUT/throughput_r50_profile.json" 2>&1 | tee "$OUT/throughput_r50_profile.txt" \
            | grep -E '^\| (ours|official|timm)|Error|error'
        ;;
    r32_profile)
        timeout "${THROUGHPUT_S:-200}" python3 benchmarks/throughput.py --device cuda --models ride_resnet32_4e \
            --modes train --precision bf16 --channels-last --cuda-graph --baseline none --profile 3 \
            --seconds 0.2 --repeats 2 --warmup 1 --json "$OUT/throughput_r32_profile.json" 2>&1 \
            | tee "$OUT/throughput_r32_profile.txt" | grep -E '^\| ours|Error|error'
        ;;
    epilogue)
        timeout "${EPILOGUE_S:-60}" python3 benchmarks/conv_epilogue.py 2>&1 | tee "$OUT/conv_epilogue.txt"
        ;;
    r50_compile_train)
        timeout "${COMPILE_S:-300}" python3 benchmarks/throughput.py --device cuda "${official_args[@]}" \
            --models ride_resnet50_3e --modes train --precision bf16 --channels-last --compile --baseline none \
            --seconds 0.3 --repeats 3 --warmup 2 --json "$OUT/throughput_r50_compile_train.json" 2>&1 \
            | tee "$OUT/throughput_r50_compile_train.txt"
        ;;
    r50_compile)
        timeout "${COMPILE_S:-400}" python3 benchmarks/throughput.py --device cuda "${official_args[@]}" \
            --models ride_resnet50_3e --modes train infer routed --precision bf16 --compile --seconds 0.3 \
            --repeats 3 --warmup 2 --json "$OUT/throughput_r50_compile.json" 2>&1 | tee "$OUT/throughput_r50_compile.txt"
        ;;
    *) echo "unknown part $part (parts: tests train speedrun speedrun_seed1 speedrun_fp32 speedrun_lr05 speedrun_wide r32 r50 r50_profile epilogue r50_compile_train r50_compile)" ;;
    esac
done
