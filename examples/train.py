"""A small training run that swaps torch.optim for fusedopt in one line, with mixed
precision (autocast + GradScaler), an LR scheduler, a compiled optimizer step and a
checkpoint/resume that continues exactly as the uninterrupted run.

    python examples/train.py [--steps 60] [--device cpu|cuda] [--optim AdamW]

The task: fit a fixed random two-layer teacher network from inputs drawn on the fly.
"""
import argparse
import types
import io

import torch

import fusedopt as optim  # was: import torch.optim as optim


def batches(device, steps, dim=32, size=64):
    gen = torch.Generator().manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    for p in teacher.parameters():
        p.requires_grad_(False)
    for _ in range(steps):
        x = torch.randn(size, dim, generator=gen)
        yield x.to(device), teacher(x).to(device)


def build(args):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(),
                                torch.nn.Linear(128, 128), torch.nn.GELU(),
                                torch.nn.Linear(128, 4)).to(args.device)
    opt = getattr(optim, args.optim)(model.parameters(), lr=3e-3)
    # the step compiled whole (fullgraph): one graph, no recompiles while the scheduler
    # changes lr.  Done before the scheduler wraps opt.step, so that its wrapper (which
    # dynamo would skip) runs eagerly around the compiled step.
    opt.step = types.MethodType(torch.compile(type(opt).step, fullgraph=True), opt)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps)
    scaler = torch.amp.GradScaler(args.device, init_scale=2.0 ** 10)
    return model, opt, sched, scaler


def train(args, model, opt, sched, scaler, data):
    losses = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)  # calls opt.step (compiled) unless a gradient is inf/NaN
        scaler.update()
        sched.step()
        losses.append(loss.item())
    return losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--optim", default="AdamW", choices=["Adam", "AdamW", "Adamax", "RMSprop", "Adagrad", "SGD"])
    args = ap.parse_args(argv)
    half = args.steps // 2

    # the uninterrupted run
    model, opt, sched, scaler = build(args)
    data = list(batches(args.device, args.steps))
    losses = train(args, model, opt, sched, scaler, data[:half])
    ckpt = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "scaler": scaler.state_dict()}, ckpt)
    losses += train(args, model, opt, sched, scaler, data[half:])

    # resume from the checkpoint in fresh objects, loaded onto the CPU first
    ckpt.seek(0)
    state = torch.load(ckpt, map_location="cpu")
    model2, opt2, sched2, scaler2 = build(args)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    scaler2.load_state_dict(state["scaler"])
    resumed = train(args, model2, opt2, sched2, scaler2, data[half:])

    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    print(f"{args.optim} on {args.device}: loss {losses[0]:.4f} -> {losses[-1]:.4f} "
          f"in {args.steps} steps; resumed run identical: {same}")
    if not same or resumed != losses[half:] or not losses[-1] < losses[0]:
        raise SystemExit("example failed: resume differs or the loss did not fall")


if __name__ == "__main__":
    main()
