#!/usr/bin/env bash
# Every GPU measurement of issue 17 in one run: about 5-7 minutes on one H200 (estimated: it has
# not run there yet; the steps' time limits add up to 9 minutes). Not part of `make test`: CI has
# no GPU.
#
#   1. tests   the GPU tests of tests/test_devices.py (CUDA's sync check around the hooks and the
#              accumulator, every verb on --device cuda against the CPU, CPU offload against the GPU)
#              and the saliency tests
#   2. breakdown  benchmarks/profile_breakdown.py --device cuda: syncs, copies and launches
#   3. agreement  benchmarks/device_agreement.py --device cuda: GPU vs CPU (float32), bf16 vs float32
#   4. overhead   benchmarks/profile_overhead.py on Qwen3-30B-A3B's shape: the issue's table, peak GPU
#                 memory against `moescope inspect`'s estimate, fake-quantisation times
#   5. demo       moescope demo --quick --device cuda
#
# The machine's python3 has torch with CUDA and accelerate but an older transformers; carry
# transformers 5.24 as a wheel. Once, in the root of the checkout that the device tool sends:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl transformers==5.24.0
# Then, with the device tool: command `bash scripts/gpu_measure.sh`, carry [".whl"], timeout_s 590.
# Each step's log goes to $OUT/STEP.log (runs/gpu without the tool); the summary prints last.
#
# A check of the script itself at tiny size on a CPU (a few minutes on 2 cores):
#   DEVICE=cpu SHAPE=tiny SLOWER=4 PATH="$PWD/.venv/bin:$PATH" SIZES="--prompts 8 --tokens 32 --rounds 1 \
#       --generate 4 --generate-prompts 4 --generate-tokens 32" bash scripts/gpu_measure.sh

set -uo pipefail
out=${OUT:-runs/gpu}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| accelerate', accelerate.__version__, '|', torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'no CUDA')" | tee "$out/versions.log"

device=${DEVICE:-cuda}
shape=${SHAPE:-qwen3-30b-a3b}
read -r -a sizes <<<"${SIZES:---prompts 64 --tokens 2048 --rounds 2 --generate 32 --generate-prompts 16 --generate-tokens 256}"
slower=${SLOWER:-1}  # multiplies every step's time limit
summary=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the log, note the outcome
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name: $*"
    timeout $((limit * slower)) "$@" 2>&1 | tee "$out/$name.log"
    local status=${PIPESTATUS[0]}
    summary+=("$name: exit $status after $((SECONDS - start)) s")
}

step tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_capture.py -k \
    "gpu or every_verb or saliency or never_waits"
step breakdown 45 python3 benchmarks/profile_breakdown.py --device "$device"
step agreement 45 python3 benchmarks/device_agreement.py --device "$device"
step overhead 240 python3 benchmarks/profile_overhead.py --device "$device" --shape "$shape" --dtype bfloat16 \
    "${sizes[@]}" --quantize
step demo 90 python3 -m moescope.cli demo --quick --device "$device" --out "$(mktemp -d)/demo"

echo "=== summary"
printf '%s\n' "${summary[@]}" | tee "$out/summary.log"
grep -h -E "ratio to|token-layer|peak GPU|fake-quantising|passed|failed|op calls|demo finished" "$out"/*.log
