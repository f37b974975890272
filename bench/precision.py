"""The low-precision options side by side: a bfloat16 MLP trained 200 AdamW steps (lr 1e-4,
weight decay 0.01, fixed random data: tests/helpers/precision_mlp.py), its distance to the
float32 run and the optimizer state it keeps per param.  Prints the markdown table of
docs/options.md#low-precision-params-compared.
    python bench/precision.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "helpers"))
from precision_mlp import distance, optimi_adamw, state_bytes, train  # noqa: E402

ROWS = [("plain bfloat16", {}),
        ("stochastic_rounding=True", dict(stochastic_rounding=True)),
        ("kahan_sum=True", dict(kahan_sum=True)),
        ("kahan_sum=True, state_dtype=float32", dict(kahan_sum=True, state_dtype=torch.float32)),
        ("master_weights=True (float32 state)", dict(master_weights=True)),
        ('master_weights="remainder" (float32 state)', dict(master_weights="remainder")),
        ("optimi.AdamW(kahan_sum=True)", dict(make=optimi_adamw, kahan_sum=True))]


def main():
    ref, opt32 = train(torch.float32)
    print("| bfloat16 params, AdamW | distance to the float32 run | closer than plain | "
          "state bytes / param |")
    print("|---|---:|---:|---:|")
    plain = None
    for label, kw in ROWS:
        if kw.get("make") is optimi_adamw:
            try:
                import optimi  # noqa: F401
            except ImportError:
                continue
        x, opt = train(torch.bfloat16, **kw)
        d = distance(x, ref)
        plain = plain or d
        print(f"| {label} | {d:.3g} | {plain / d:.1f}x | {state_bytes(opt):g} |")
    print(f"| (float32 params, for scale) | 0 | | {state_bytes(opt32):g} |")


if __name__ == "__main__":
    main()
