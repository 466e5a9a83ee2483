#!/usr/bin/env bash
# The one prepared script for a lent CUDA machine (the device tool's H200 image holds torch,
# triton, pytest, hypothesis and matplotlib; no network). In at most 8 minutes it builds
# convrec._C with its CUDA kernel in place, runs the GPU tests, measures the encoder step table
# (benchmarks/encoder_step.py), the per-event cost of streaming ConvRec against a recompute and a
# SASRec KV cache (benchmarks/streaming_cost.py) and one Beauty training epoch of ConvRec (eager
# and --compile), of streaming ConvRec and of SASRec, and packs every log and result into ONE
# tarball (the machine hands back only a few files):
#
#     bash benchmarks/gpu_check.sh [DATA] [TARBALL]
#
# DATA holds s3rec/Beauty*.txt/json (default shared/data: copy ../shared/data/s3rec/Beauty* into
# the checkout's ignored shared/ folder, which travels to the device); TARBALL defaults to
# $OUT/gpu_check.tgz. Each step has a time limit and a failed step does not stop the next, so
# the run always ends in time with what finished; status.md lists every step, its exit code
# and seconds. STEPS="build encoder_step" runs only the named steps (environment always runs).
set -uo pipefail
cd "$(dirname "$0")/.."
data=$(realpath -m "${1:-shared/data}")
tarball=$(realpath -m "${2:-${OUT:-/tmp}/gpu_check.tgz}")
work=$(mktemp -d)
python=${PYTHON:-python3}
status="$work/status.md"
printf '# gpu_check.sh steps\n\n| step | exit code | seconds |\n|---|---|---|\n' > "$status"
steps=" ${STEPS:-environment build gpu_tests triton_tests encoder_step streaming_cost epoch_convrec epoch_convrec_compiled epoch_streaming epoch_sasrec} "
export OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  if [[ $name != environment && $steps != *" $name "* ]]; then
    echo "| $name | skipped (STEPS) | 0 |" >> "$status"
    return
  fi
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  local code=$?
  tail -n 4 "$work/$name.log"
  echo "| $name | $code | $((SECONDS - start)) |" >> "$status"
}

epoch() {  # epoch NAME FLAGS...: one Beauty epoch on the GPU, its summary kept
  local name=$1
  shift
  "$python" -m convrec train --data "$data/s3rec/Beauty" --device cuda --epochs 1 \
    --no-progress --out "$work/$name" "$@" && cp "$work/$name/summary.json" "$work/$name.json"
}

# limits add up to 475 s: the whole run fits an 8-minute budget with the tarball
step environment 10 bash -c "nvidia-smi; $python -c 'import torch, triton, sys; \
print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__); \
print(torch.cuda.get_device_name())'"
step build 120 env CONVREC_CUDA=1 MAX_JOBS=16 "$python" -m pip install -v --no-build-isolation \
  --no-deps --no-index -e .
cp convrec/_build_status.json "$work/" 2>/dev/null
# only the tests that run on the GPU (named cuda / triton, or with such a parameter): the
# CPU tests of these files are CI's, and here they would eat the step's time
step gpu_tests 65 "$python" -m pytest -q -x -p no:cacheprovider tests/test_downscale.py \
  tests/test_dispatch.py tests/test_embed_conv_pool.py tests/test_dispatch_count.py \
  tests/test_stack_dropout.py tests/test_stream_downscale.py tests/test_all_items.py \
  tests/test_gelu_paper_norm.py -k "cuda or triton" --junitxml="$work/gpu_tests.xml"
# the whole-stack Triton kernels compile one variant per dtype and flag set: their own step
step triton_tests 60 "$python" -m pytest -q -p no:cacheprovider tests/test_downscale_triton.py \
  --junitxml="$work/triton_tests.xml"
step encoder_step 110 "$python" -m benchmarks.encoder_step --device cuda --budget-s 80 \
  --out "$work/encoder_step"
# eager series only: compiling the push takes ~12 s per length, more than the step's limit
step streaming_cost 15 "$python" -m benchmarks.streaming_cost --device cuda --repeats 5 \
  --series "streaming push" "full recompute" "SASRec KV cache" --out "$work/streaming_cost"
step epoch_convrec 30 epoch convrec --model convrec --train-sampling all-prefixes
step epoch_convrec_compiled 25 epoch convrec_compiled --model convrec \
  --train-sampling all-prefixes --compile
step epoch_streaming 20 epoch streaming --model convrec --streaming --train-sampling all-positions
step epoch_sasrec 20 epoch sasrec --model sasrec --train-sampling all-positions
cat "$status"
mkdir -p "$(dirname "$tarball")"
tar czf "$tarball" -C "$work" .
echo "wrote $tarball"
