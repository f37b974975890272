"""Memory of 8-bit and 4-bit state, measured: a training run of a GPT-2-sized stack of linear layers
(42.5M params: 18 layers of 768 x 3072; 50 AdamW steps on random data) in a fresh process per setting; prints
the optimizer state's bytes per param (the sum of its tensors' sizes) and the process's
peak resident memory (ru_maxrss).
    python bench/memory_8bit.py [float32] [uint8] [uint4]
"""
import subprocess
import sys

RUN = """
import resource, sys, torch, fusedopt
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(768, 3072) if i % 2 == 0 else torch.nn.Linear(3072, 768)
                              for i in range(18)])
x = torch.randn(64, 768)
state_dtype = {"float32": None, "uint8": torch.uint8, "uint4": torch.uint4}[sys.argv[1]]
opt = fusedopt.AdamW(model.parameters(), lr=1e-4, state_dtype=state_dtype)
for _ in range(50):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
n = sum(p.numel() for p in model.parameters())
state = sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
            if k != "step")
print(n, state / n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


def main():
    print(f"{'state':8} {'params':>12} {'state B/param':>14} {'peak RSS GiB':>13}")
    for name in sys.argv[1:] or ("float32", "uint8", "uint4"):
        out = subprocess.run([sys.executable, "-c", RUN, name], capture_output=True, text=True,
                             check=True).stdout.split()
        n, per, rss = int(out[0]), float(out[1]), float(out[2])
        print(f"{name:8} {n:12,d} {per:14.4f} {rss:13.3f}")


if __name__ == "__main__":
    main()
