"""Benchmark fusedopt's step against torch's for-loop, foreach and fused steps on this machine.

    python bench/bench.py --optim adam,adamw,adamax,rmsprop,adagrad,sgd,adam-bf16,adam-clip \
        --json bench/results/cpu.json --plot bench/results/cpu.png

The same as ``fusedopt bench`` (see ``fusedopt bench --help``).
"""
import sys

from fusedopt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
