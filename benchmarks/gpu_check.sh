#!/usr/bin/env bash
# The one prepared script for a machine with a CUDA GPU (the device tool's H200 image already
# holds torch, triton, pytest, pytest-benchmark, hypothesis and matplotlib). Installs nothing from
# the network: it builds convrec._C with its CUDA kernel in place, runs the GPU tests and the
# kernel benchmarks, and writes CSV + Markdown into one folder:
#
#     bash benchmarks/gpu_check.sh "$OUT"      # default folder: benchmarks/results/gpu
#
# Each step has its own time limit and a failed step does not stop the next ones, so a short
# device lease still returns what finished; status.md lists every step with its exit code.
# STEPS="build gpu_tests kernels" runs only the named steps (environment always runs).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-${OUT:-benchmarks/results/gpu}}")
mkdir -p "$out"
python=${PYTHON:-python3}
status="$out/status.md"
printf '# gpu_check.sh steps\n\n| step | exit code | seconds |\n|---|---|---|\n' > "$status"

steps=" ${STEPS:-environment build gpu_tests kernels downscale_bf16 downscale_fp32 scaling} "

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  if [[ $name != environment && $steps != *" $name "* ]]; then
    echo "| $name | skipped (STEPS) | 0 |" >> "$status"
    return
  fi
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local code=$?
  tail -n 5 "$out/$name.log"
  echo "| $name | $code | $((SECONDS - start)) |" >> "$status"
}

step environment 60 bash -c "nvidia-smi; $python -c 'import torch, triton, sys; \
print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__); \
print(torch.cuda.get_device_name())'"
# editable install without dependencies or index: the package and the
# CUDA build of convrec._C (CONVREC_CUDA=1) against the image's torch
step build 420 env CONVREC_CUDA=1 MAX_JOBS=16 "$python" -m pip install --no-build-isolation \
  --no-deps --no-index -e .
step gpu_tests 420 "$python" -m pytest -q -x tests/test_downscale.py tests/test_gather_embed.py \
  tests/test_conv_pool.py tests/test_embed_conv_pool.py tests/test_encoder.py \
  tests/test_dispatch.py --junitxml="$out/gpu_tests.xml"
step kernels 480 "$python" -m benchmarks.kernels --out "$out/kernels"
step downscale_bf16 240 "$python" -m benchmarks.downscale_table --device cuda --dtype bf16 \
  --out "$out/downscale_cuda_bf16"
step downscale_fp32 240 "$python" -m benchmarks.downscale_table --device cuda --dtype fp32 \
  --out "$out/downscale_cuda_fp32"
step scaling 600 "$python" -m benchmarks.scaling --device cuda --budget 60 --repeats 5 \
  --out "$out/scaling_cuda" --no-progress
cat "$status"
