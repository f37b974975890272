"""The README's figure: fusedopt's Adam step against torch's best path on the three CPU
workloads, as GB/s moved, with the roof measured in the same run.

    python bench/readme_figure.py [--json bench/results/cpu.json] [--out bench/results/cpu-adam-readme.png]

It only reads a committed result (no timing): the default input is `cpu.json`, written by
`python bench/bench.py --optim adam,adamw,adamax,rmsprop,adagrad,sgd,adam-bf16,adam-clip
--json bench/results/cpu.json --plot bench/results/cpu.png`.
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WORKLOADS = (("gpt2-124m", "GPT-2 124M shapes\n(148 tensors)"),
             ("many-small", "many-small\n(5000 x 4096)"),
             ("tiny", "tiny\n(20000 x 100)"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/cpu.json")
    ap.add_argument("--optim", default="adam")
    ap.add_argument("--out", default="bench/results/cpu-adam-readme.png")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if r["optimizer"] == args.optim]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.38
    for i, (wl, _) in enumerate(WORKLOADS):
        mine = [r for r in rows if r["workload"] == wl]
        ours = next(r for r in mine if r["impl"] == "fusedopt")
        torch_best = min((r for r in mine if r["impl"].startswith("torch")), key=lambda r: r["ms"])
        roof = next(r for r in mine if r["impl"] == "roof")
        for k, (r, colour, label) in enumerate(((ours, "tab:blue", "fusedopt"),
                                                 (torch_best, "tab:grey", "torch's best path"))):
            x = i + (k - 0.5) * width
            ax.bar(x, r["gb_per_s"], width, color=colour, label=label if i == 0 else None)
            # the step's time at the bar's foot (the bars' tops meet the roof's line)
            ax.text(x, 0.13, f"{r['ms']:.1f} ms" + (f"\n{r['impl'].replace('torch-', '')}" if k else ""),
                    ha="center", va="bottom", fontsize=7, color="white")
        ax.hlines(roof["gb_per_s"], i - width, i + width, colors="k", linestyles="--",
                  label="roof (same run)" if i == 0 else None)
    ax.set_xticks(range(len(WORKLOADS)))
    ax.set_xticklabels([label for _, label in WORKLOADS], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(0.1, 1000)
    ax.set_ylabel("GB/s moved by one step", fontsize=8)
    m = data["machine"]
    ax.set_title(f"{args.optim}, one step, float32: {m['device']}, {m['threads']} threads, "
                 f"torch {m['torch']}, {m['date']}", fontsize=8)
    ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
