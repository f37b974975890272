"""Named parameter-shape workloads for benchmarks."""


def gpt2_124m():
    """GPT-2 small (124M): 148 tensors, token embedding tied to the output layer."""
    d, layers = 768, 12
    shapes = [(50257, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def llama_1b():
    """Llama-3.2-1B shapes (GPU benchmark): 16 layers, d=2048, GQA 8 KV heads, tied embedding."""
    d, ff, kv, layers = 2048, 8192, 512, 16
    shapes = [(128256, d)]
    for _ in range(layers):
        shapes += [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff), (d,), (d,)]
    return shapes + [(d,)]


def gpt2_hidden(layers=12):
    """GPT-2 small's hidden 2-D weights (what muon_param_groups gives Muon: 48 matrices,
    85M params; embeddings, head, gains and biases go to AdamW); ``layers``: the first
    blocks alone (one block: its four matrices, each shape once)."""
    d = 768
    return [s for _ in range(layers) for s in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d))]


WORKLOADS = {
    "gpt2-124m": gpt2_124m,
    # 2-D alone (Muon): GPT-2's hidden weights, one block of them, many small same-shape
    # matrices, a mixture of experts' (64 experts x 3 matrices)
    "gpt2-124m-hidden": gpt2_hidden,
    "gpt2-block": lambda: gpt2_hidden(1),
    "muon-128x128": lambda: [(128, 128)] * 1024,
    "moe-64x3": lambda: [(1024, 256)] * (64 * 3),
    "many-small": lambda: [(4096,)] * 5000,
    "tiny": lambda: [(100,)] * 20000,
    "llama-1b": llama_1b,
}


def gpt2_like(max_params):
    """GPT-2 small's 148 tensors with every dimension scaled down so that the model has
    at most ``max_params`` parameters (all of GPT-2-124M when that is larger): the same
    mix of tensor sizes, less memory (``fusedopt check`` sizes it to the machine)."""
    full = sum(_numel(s) for s in gpt2_124m())
    f = min(1.0, (max_params / full) ** 0.5)
    while True:
        d = max(64, round(768 * f / 64) * 64)
        vocab, ctx = max(64, round(50257 * f)), max(64, round(1024 * f))
        shapes = [(vocab, d), (ctx, d)]
        for _ in range(12):
            shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                       (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
        shapes += [(d,), (d,)]
        if f == 1.0:
            return gpt2_124m()
        if sum(_numel(s) for s in shapes) <= max_params or d == 64:
            return shapes
        f *= 0.97


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
