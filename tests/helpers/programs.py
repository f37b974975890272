"""Random programs of ordinary PyTorch calls, run on fusedopt and on its torch.optim twin
side by side (tests/test_safety.py runs them in a subprocess, so that a crash fails the
test instead of killing pytest; bench/soak.py runs many).

    python tests/programs.py FIRST_SEED COUNT [numba|triton|both]

Each seed picks an optimizer, an engine and ~12 operations: steps, zero_grad both ways,
`p.data =` / `p.set_` replacements (same and other shape or dtype), memory-format
changes, vector_to_parameters, state entry replacement and deletion, state.clear(),
load_state_dict (good, wrong shape, missing key), add_param_group, reordering
group["params"], reassigning it (a sub-list, new params) or deleting a group, GradScaler
steps with an inf or with channels_last grads (the grads compared after), clip_grad_norm_
over params of mixed dtypes against torch's, frozen params, grads set to None or of
another size or dtype, grads that are memory the step writes; with flat buffers or
without; some programs with max_grad_norm= (torch's side: clip_grad_norm_ over its current
params before each step; program_twin.py holds the two sides).  After every operation:
where torch raises, fusedopt raises the same exception type (and the program ends:
torch's for-loop leaves a half-done step behind); otherwise the params agree within
float32 rounding (torch's side replays its ops correctly rounded, fusedopt/arith.py).
Prints one line per program; exits 1 on a disagreement.
"""
import copy
import math
import random
import sys

import torch

from program_twin import NAMES, SHAPES, Raised, Twin, compare  # sets TRITON_INTERPRET
import fusedopt  # noqa: E402  (after it: the Triton engine on CPU tensors)


def op_step(t):
    t.grads()
    t.step()


def op_zero_grad(t):
    none = t.rng.random() < 0.5
    for o in t.opt:
        o.zero_grad(set_to_none=none)


def op_replace_data(t):
    k = t.rng.randrange(len(SHAPES))
    how = t.rng.choice(["clone", "set_", "channels_last", "clone", "set_", "channels_last",
                        "double", "shape", "narrow"])
    for ps in (t.params(0), t.params(1)):
        if k >= len(ps):
            return
        p = ps[k]
        if how == "clone":
            p.data = p.data.clone()
        elif how == "set_":
            with torch.no_grad():
                p.set_(p.detach().clone())
        elif how == "channels_last" and p.dim() == 4:
            p.data = p.data.to(memory_format=torch.channels_last)
        elif how == "double":
            p.data = p.data.double()
        elif how == "shape":
            p.data = torch.zeros(3) + p.data.flatten()[:1]
        elif how == "narrow":  # a view at the same address, fewer elements
            p.data = p.data.flatten()[:max(1, p.numel() // 2)]


def op_module_dtype(t):
    dtype = t.rng.choice([torch.float64, torch.float16, torch.float32])
    t.low |= dtype == torch.float16  # float16 differences stay in the values that follow
    for ps in (t.params(0), t.params(1)):
        for p in ps:
            p.data = p.data.to(dtype)


def op_vector_to_parameters(t):
    vec = torch.randn(sum(p.numel() for p in t.params(1)),
                      generator=torch.Generator().manual_seed(t.rng.randrange(1 << 30)))
    for k in range(2):
        ps = t.params(k)
        if len({p.dtype for p in ps}) == 1:
            # a copy per side (vec.to(float32) would be vec itself: both sides' params
            # would be one memory, and every later comparison vacuous)
            torch.nn.utils.vector_to_parameters(vec.to(ps[0].dtype, copy=True), ps)


def op_state_entry(t):
    k = t.rng.randrange(len(SHAPES))
    how = t.rng.choice(["replace", "delete", "clear", "swap"])
    for o, ps in zip(t.opt, (t.params(0), t.params(1))):
        if k >= len(ps) or ps[k] not in o.state:
            return
    for o, ps in zip(t.opt, (t.params(0), t.params(1))):
        p = ps[k]
        if how == "clear":
            o.state.clear()
        elif how == "delete":
            del o.state[p]
        else:
            st = o.state[p]
            for key in list(st):
                if key != "step" and torch.is_tensor(st[key]):
                    if how == "swap":  # the storage swapped in place, the mapping unchanged
                        st[key].data = st[key].data * (1 if key == "grad_avg" else 2)
                    else:
                        st[key] = torch.full_like(st[key], 0.5)


def op_load_state_dict(t):
    how = t.rng.choice(["good", "good", "good", "shape", "missing"])
    # (torch's state_dict raises KeyError for state of a param no group holds any more:
    # op_regroup)
    sds = []
    for o in t.opt:
        try:
            sds.append(o.state_dict())
        except Exception as e:  # noqa: BLE001
            sds.append(type(e).__name__)
    if any(isinstance(sd, str) for sd in sds):
        raise Raised(*(sd if isinstance(sd, str) else None for sd in sds))
    sd = copy.deepcopy(sds[1])
    # an entry may be empty (an earlier "missing" load took a param's only buffer away)
    held = sorted(i for i, st in sd["state"].items() if st)
    if how != "good" and held:
        i = t.rng.choice(held)
        key = t.rng.choice([k for k in sd["state"][i] if k != "step"] or ["step"])
        if how == "shape":
            sd["state"][i][key] = torch.zeros(2)
        else:
            del sd["state"][i][key]
    t.grads()
    try:
        t.step(load=sd)
    except Raised as e:
        # fusedopt refuses a state tensor of the wrong shape at the load (also one that a
        # param's new shape made wrong); torch raises at a step that reaches it, with
        # whatever it meets first there, or not at all if the param is frozen
        if how == "shape" or e.ours_at_load:
            assert e.ours == "RuntimeError" and e.ours_at_load, (e.ours, e.ours_at_load)
            e.theirs = e.ours
        raise


def op_add_group(t):
    init = torch.randn(6, generator=torch.Generator().manual_seed(t.rng.randrange(1 << 30)))
    for o in t.opt:
        o.add_param_group({"params": [torch.nn.Parameter(init.clone())]})


def op_reorder(t):
    g = t.rng.randrange(len(t.opt[0].param_groups))
    perm = list(range(len(t.opt[0].param_groups[g]["params"])))
    t.rng.shuffle(perm)
    for o in t.opt:
        ps = o.param_groups[g]["params"]
        ps[:] = [ps[i] for i in perm]


def op_scaler(t):
    if t.scaler is None:
        t.scaler = [torch.amp.GradScaler("cpu", init_scale=256.0) for _ in range(2)]
        for s in t.scaler:
            s.scale(torch.ones(()))
    # (a grad that is a param's memory, op_grad_meets: torch's for-loop unscales it in
    # place before its step reads the param; the kernel reads the param before it writes
    # the unscaled grad: those grads are replaced first)
    for p in t.meets:
        if p.grad is not None:  # (.data: the param's dtype may have moved on since)
            p.grad.data = p.grad.data.clone()
    t.meets.clear()
    inf = t.rng.random() < 0.5
    t.grads(scale=256.0, inf=inf)
    if t.rng.random() < 0.5:  # a conv's grad: 4-D, channels_last (not contiguous)
        for ps in (t.params(0), t.params(1)):
            for p in ps:
                if p.grad is not None and p.grad.dim() == 4:
                    p.grad = p.grad.contiguous(memory_format=torch.channels_last)
    try:
        t.step(run=lambda t, k: t.scaler[k].step(t.opt[k]), scaled=True)
    except Raised as e:
        # float16 grads: GradScaler refuses to unscale them for torch's for-loop (before
        # its step); fusedopt unscales in its kernel and takes them, as torch's fused
        # optimizers do, so its step goes on (and raises what it meets there, if anything)
        if e.theirs == "ValueError" and t.low:
            e.theirs = e.ours
        # no param has a grad: the scaler asserts that its for-loop unscale recorded an inf
        # check; torch's fused optimizers (and fusedopt) step nothing
        if e.theirs == "AssertionError" and e.ours is None \
                and all(p.grad is None for p in t.params(0)):
            e.theirs = e.ours
        raise
    for s in t.scaler:
        s.update()
    # the grads unscaled, as torch's unscale_ leaves them (also where an inf skipped the
    # step); under max_grad_norm, clipped as well, except where an inf skipped the step:
    # then torch's clip by an inf norm made them 0 and NaN, fusedopt's step took nothing
    if not (inf and t.max_norm is not None and not t.own_clip):
        compare(t, "grads after a scaler step", grads=True)


def op_freeze(t):
    k = t.rng.randrange(len(SHAPES))
    for ps in (t.params(0), t.params(1)):
        if k < len(ps):
            ps[k].grad = None
            ps[k].requires_grad_(False)


_SAME_WIDTH = {torch.float32: torch.int32, torch.float64: torch.int64,
               torch.float16: torch.bfloat16, torch.bfloat16: torch.float16}


def op_bad_grad(t):
    k = t.rng.randrange(len(SHAPES))
    how = t.rng.choice(["none", "none", "size", "dtype", "width"])
    t.grads()
    for ps in (t.params(0), t.params(1)):
        if k >= len(ps) or ps[k].grad is None:
            return
    for ps in (t.params(0), t.params(1)):
        g = ps[k].grad
        if how == "none":
            ps[k].grad = None
        elif how == "size":
            g.data = torch.ones(4, dtype=g.dtype)
        elif how == "width":  # the same bytes read as another dtype
            g.data = g.data.view(_SAME_WIDTH.get(g.dtype, g.dtype))
        else:
            g.data = g.data.double()
    t.step()


def _meets(t, side, k, j, how):
    # the memory param k's grad is to alias on one side: a prefix of param j, of its own
    # memory, or of param j's state tensor `how`; None where there is none that fits
    ps, o = t.params(side), t.opt[side]
    p = ps[k]
    src = p if how == "own" else ps[j] if how == "other" else o.state.get(ps[j], {}).get(how)
    if not torch.is_tensor(src) or src.dtype != p.dtype or src.numel() < p.numel() \
            or not src.is_contiguous() or src.device != p.device:
        return None
    return src.detach().view(-1)[:p.numel()].view(p.shape)


def op_grad_meets(t):
    """A grad that is memory the step writes (another param's, its own, a state tensor's):
    torch reads it before or after that tensor's update, in param order.  (Not with flat
    buffers: a plan built there moves the params into new buffers, and a view of the old
    memory no longer tracks them: docs/options.md, flat.)"""
    if t.flat or t.max_norm is not None:  # (torch's clip would scale the memory too)
        return
    t.grads()
    n = len(t.params(1))
    if not n:
        return
    k, j = t.rng.randrange(n), t.rng.randrange(n)
    keys = sorted(key for key, v in t.opt[1].state.get(t.params(1)[j], {}).items()
                  if torch.is_tensor(v) and v.dim() > 0)
    how = t.rng.choice(["own", "other", "other", *keys])
    views = [_meets(t, side, k, j, how) for side in (0, 1)]
    if None in views or not t.params(1)[k].requires_grad:
        return
    for ps, v in zip((t.params(0), t.params(1)), views):
        ps[k].grad = v
    t.meets += [ps[k] for ps in (t.params(0), t.params(1))]
    t.step()


def op_regroup(t):
    """group["params"] reassigned (a sub-list, reordered, new params added) or a group
    deleted, between steps; the state of a param no group holds stays in opt.state."""
    groups = t.opt[1].param_groups
    g = t.rng.randrange(len(groups))
    how = t.rng.choice(["sub", "sub", "new", "delete"])
    if how == "delete" and len(groups) > 1:
        for o in t.opt:
            del o.param_groups[g]
        return
    keep = [i for i in range(len(groups[g]["params"])) if t.rng.random() < 0.7]
    t.rng.shuffle(keep)
    shape = t.rng.choice(SHAPES)
    init = torch.randn(shape, generator=torch.Generator().manual_seed(t.rng.randrange(1 << 30)))
    for o in t.opt:
        ps = o.param_groups[g]["params"]
        extra = [torch.nn.Parameter(init.clone())] if how == "new" else []
        o.param_groups[g]["params"] = [ps[i] for i in keep] + extra


def op_clip(t):
    """fusedopt.clip_grad_norm_ against torch's on the grads of params of mixed dtypes:
    the same norm, the same clipped grads (which a later step may take)."""
    for _ in range(t.rng.randrange(3)):
        k = t.rng.randrange(len(SHAPES))
        dtype = t.rng.choice([torch.bfloat16, torch.float16, torch.float64])
        t.low |= dtype in (torch.float16, torch.bfloat16)
        for ps in (t.params(0), t.params(1)):
            if k < len(ps):
                ps[k].data = ps[k].data.to(dtype)
    t.grads()
    max_norm = t.rng.choice([0.1, 2.0, 1e3])
    order = t.rng.choice([2.0, 2.0, 1.0, math.inf])
    norms = []
    for k, clip in enumerate((fusedopt.clip_grad_norm_, torch.nn.utils.clip_grad_norm_)):
        try:
            norms.append(clip(t.params(k), max_norm, order))
        except Exception as e:  # noqa: BLE001
            norms.append(type(e).__name__)
    if any(isinstance(n, str) for n in norms):
        raise Raised(*(n if isinstance(n, str) else None for n in norms))
    a, b = norms
    assert a.dtype == b.dtype, ("clip norm dtype", a.dtype, b.dtype)
    rel = (abs(a.double() - b.double()) / b.double()).item() if b else abs(a).item()
    assert rel <= 1e-5 or (t.low and rel <= 1e-2), ("clip norm", order, a.item(), b.item())
    # both multiply each grad by the factor and round once: equal where the norms are (a
    # last-place rounding apart where they are not)
    for p, q in zip(t.params(0), t.params(1)):
        if p.grad is None or q.grad is None:
            assert p.grad is q.grad, ("a grad on one side only after clip_grad_norm_", order)
            continue
        eps = torch.finfo(q.grad.dtype).eps if rel else 0.0
        torch.testing.assert_close(p.grad, q.grad, rtol=2 * rel + eps, atol=0, equal_nan=True,
                                   msg=lambda m: f"grads after clip_grad_norm_ {order}: {m}")


OPS = [op_step] * 6 + [op_zero_grad, op_replace_data, op_module_dtype, op_vector_to_parameters,
                       op_state_entry, op_load_state_dict, op_add_group, op_reorder, op_scaler,
                       op_freeze, op_bad_grad, op_grad_meets, op_regroup, op_clip]


def program(seed, backends):
    rng = random.Random(seed)
    name = rng.choice(NAMES)
    t = Twin(rng, name, rng.choice(backends))
    done = []
    for _ in range(12):
        op = rng.choice(OPS)
        done.append(op.__name__[3:])
        try:
            op(t)
        except Raised as e:
            assert e.ours == e.theirs, (seed, name, done, "fusedopt:", e.ours, "torch:", e.theirs)
            return name, done, e.ours
        compare(t, (seed, name, done))
    return name, done, None


# programs that find a known difference from torch, still open: each must still fail the
# same way (when it passes, it is fixed: take it out of here)
KNOWN = {}


def main(first, count, engines="numba"):
    backends = ["numba", "triton"] if engines == "both" else [engines]
    for seed in range(int(first), int(first) + int(count)):
        if seed in KNOWN:
            try:
                program(seed, backends)
            except AssertionError as e:
                assert KNOWN[seed] in str(e), (seed, str(e))
                print(seed, "known difference, still open:", KNOWN[seed], flush=True)
                continue
            raise AssertionError(f"program {seed} now passes: take it out of KNOWN")
        name, done, raised = program(seed, backends)
        print(seed, name, " ".join(done), f"raised {raised}" if raised else "", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
