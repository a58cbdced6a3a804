#!/bin/bash
# The device check: on a machine with an NVIDIA GPU, the demo model on CUDA against the CPU in
# one run — greedy tokens equal, `localseek bench` tok/s of both, the GPU kernel tests on CUDA —
# JSON and logs to $OUT (else benchmarks/results/). Needs torch with CUDA, triton, numba, rich,
# psutil, tokenizers, safetensors, jinja2 and gguf (carried as a wheel in .whl/ where absent).
#
#     bash benchmarks/gpu_check.sh            # about 5 minutes, most of it numba compiling
set -u
DEST=${OUT:-benchmarks/results}
PY=${PY:-python3}
DAY=$(date -u +%F)
mkdir -p "$DEST"
if ! $PY -c "import gguf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba
log="$DEST/gpu_check-$DAY.log"
{
    date -u; nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    for dev in cuda cpu; do
        echo "== generate --device $dev"
        timeout 300 $PY -m localseek generate --prompt "You will" -n 32 --temperature 0 --device $dev > "/tmp/gen-$dev.txt"; echo "rc=$?"
        cat "/tmp/gen-$dev.txt"
    done
    if cmp -s /tmp/gen-cuda.txt /tmp/gen-cpu.txt; then echo "greedy text: cuda == cpu"; else echo "greedy text: cuda != cpu"; fi
    for dev in cuda cpu; do
        echo "== bench --device $dev"
        timeout 300 $PY -m localseek bench --device $dev -r 3 --json "$DEST/gpu_check-bench-$dev-$DAY.json"; echo "rc=$?"
    done
    echo "== tests/test_gpu_kernels.py (CUDA visible)"
    timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py 2>&1 | tail -15
} > "$log" 2>&1
cat "$log"
