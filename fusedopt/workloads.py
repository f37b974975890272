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


WORKLOADS = {
    "gpt2-124m": gpt2_124m,
    "many-small": lambda: [(4096,)] * 5000,
    "tiny": lambda: [(100,)] * 20000,
    "llama-1b": llama_1b,
}
