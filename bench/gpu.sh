#!/usr/bin/env bash
# One command on a fresh CUDA machine (torch + triton installed, no network needed): the
# GPU-only tests, the GPU benchmark and the compiled-Triton parity suite, everything
# written under bench/results/gpu-<device>/ (and packed into $OUT when that is set).
#   bash bench/gpu.sh            # stage limits: FUSEDOPT_GPU_LIMITS="tests bench parity breadth" seconds
#   FUSEDOPT_GPU_STAGES="breadth-parity breadth" bash bench/gpu.sh   # only these stages
# Pure-Python test dependencies the machine lacks (it has no network) can be put in .gpu-deps/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
read -r t_tests t_bench t_parity t_breadth <<< "${FUSEDOPT_GPU_LIMITS:-150 300 300 200}"
stages=" ${FUSEDOPT_GPU_STAGES:-tests bench profile breadth-parity breadth 8bit parity} "
want() { [[ "$stages" == *" $1 "* ]]; }
py=$(command -v python3 || command -v python)
[ -d .gpu-deps ] && export PYTHONPATH="$PWD/.gpu-deps${PYTHONPATH:+:$PYTHONPATH}"
# offline install: no build isolation (it would fetch setuptools); if even that fails, put
# the kernels where the package expects them and run from the tree
if ! $py -m pip install -q --no-build-isolation --no-deps -e . 2>/dev/null; then
    [ -e fusedopt/kernels ] || ln -s ../kernels fusedopt/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
dev=$($py -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out="bench/results/gpu-${dev}"
mkdir -p "$out"
{ nvidia-smi; $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    > "$out/machine.txt" 2>&1
# CUDA-graph capture, CPU state into CUDA params, mixed-precision bits equal to the CPU engine's
want tests && timeout "$t_tests" $py -m pytest -q -p no:cacheprovider tests/test_integration.py tests/test_precision.py \
    -k cuda -rs 2>&1 | tee "$out/gpu-tests.txt"
want bench && timeout "$t_bench" $py -m fusedopt bench --repeats 5 \
    --optim adam,adamw,sgd,adam-bf16,adam-clip,rmsprop,adagrad,adamax \
    --workloads gpt2-124m,llama-1b,many-small,tiny --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
want bench && $py -c "import json, sys; from fusedopt import benchmark as b; d = json.load(open(sys.argv[1])); \
b.plot(d['rows'], sys.argv[2], d['machine']['device'])" "$out/bench.json" "$out/bench.png" || true
# the host/device split of one step, fusedopt beside torch's fused Adam (issue: host work)
want profile && timeout 120 $py bench/profile_step.py --workload gpt2-124m --out "$out/profile-gpt2.txt" > /dev/null 2>&1
want profile && timeout 120 $py bench/profile_step.py --workload many-small --out "$out/profile-many-small.txt" > /dev/null 2>&1
# the algorithms torch has no fused path for (and Lion, against lion-pytorch where installed)
# (compiled parity of the same algorithms first: one flag set each, four dtypes)
want breadth-parity && timeout "$t_breadth" $py -m fusedopt parity --backends triton --steps 20 --device cuda \
    --quick --optim nadam,radam,adadelta,rprop,asgd,lion,adafactor --json "$out/parity-breadth.json" 2>&1 \
    | tee "$out/parity-breadth.txt"
want breadth && timeout "$t_breadth" $py -m fusedopt bench --repeats 5 \
    --optim adadelta,rprop,radam,nadam,asgd,lion,adafactor --workloads gpt2-124m,many-small,tiny --json "$out/bench-breadth.json" 2>&1 | tee "$out/bench-breadth.txt"
# 8-bit state: compiled Triton codes equal to Numba's, then AdamW 8-bit against torch's
# float32 AdamW and bitsandbytes' / torchao's 8-bit AdamW where importable
want 8bit && timeout 60 $py bench/check_8bit.py 2>&1 | tee "$out/check-8bit.txt"
want 8bit && timeout "$t_breadth" $py -m fusedopt bench --repeats 5 --optim adamw-8bit \
    --workloads gpt2-124m,llama-1b --json "$out/bench-8bit.json" 2>&1 | tee "$out/bench-8bit.txt"
# parity of the compiled engine on CUDA tensors against torch.optim (CPU) and float64
want parity && timeout "$t_parity" $py -m fusedopt parity --backends triton --steps 20 --device cuda \
    --json "$out/parity.json" 2>&1 | tee "$out/parity.txt"
echo "results in $out"
if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" "$out"; fi
