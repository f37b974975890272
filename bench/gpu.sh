#!/usr/bin/env bash
# One command on a fresh CUDA machine (torch + triton installed): compiled-Triton parity and
# the GPU benchmark, everything written under bench/results/gpu-<device>/.
#   bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test,plot]" 2>/dev/null || python -m pip install -q --no-deps -e .
dev=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out="bench/results/gpu-${dev}"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
# parity with the compiled Triton engine (no interpreter) against torch.optim and float64
python -m fusedopt parity --backends triton --steps 20 --json "$out/parity.json" | tee "$out/parity.txt"
# the test suite on the GPU machine (engines compiled, Triton tests on CUDA tensors)
python -m pytest -q -n 4 tests 2>&1 | tail -5 | tee "$out/tests.txt" || true
# the GPU-only tests (CUDA-graph capture, CPU state into CUDA params, mixed precision bits
# equal to the CPU engine's) with the compiled engine
TRITON_INTERPRET=0 python -m pytest -q tests/test_integration.py tests/test_precision.py -k cuda -rs 2>&1 | tail -8 \
    | tee "$out/gpu-tests.txt" || true
python -m fusedopt bench --optim adam,adamw,adamax,rmsprop,adagrad,sgd,adam-bf16,adam-clip \
    --workloads gpt2-124m,many-small,tiny,llama-1b --json "$out/bench.json" --plot "$out/bench.png" \
    | tee "$out/bench.txt"
echo "results in $out"
