"""Readable float64 definitions of each algorithm: what the kernels are tested against.

Written from the algorithms as torch.optim documents them, one tensor at a time, in
float64, without regard to speed.  ``step(name, params, grads, states, **hp)`` applies one
step of optimizer ``name`` to lists of float64 tensors (updated in place); ``states`` is
a list of dicts, one per param, kept between calls.  ``l1`` adds ``l1 * sign(param)`` to
the gradient, after weight decay.
"""
import math

import torch


def _regularize(p, g, hp, coupled=True):
    g = -g if hp.get("maximize") else g
    if coupled and hp.get("weight_decay", 0):
        g = g + hp["weight_decay"] * p
    if hp.get("l1", 0):
        g = g + hp["l1"] * torch.sign(p)
    return g


def _adam_moments(p, g, st, lr, betas, decoupled, hp):
    # the Adam family's first half: weight decay (decoupled or L2), then both moments
    if decoupled:
        p.mul_(1 - lr * hp.get("weight_decay", 0))
    g = _regularize(p, g, hp, coupled=not decoupled)
    m = st["exp_avg"] = betas[0] * st.get("exp_avg", 0 * p) + (1 - betas[0]) * g
    v = st["exp_avg_sq"] = betas[1] * st.get("exp_avg_sq", 0 * p) + (1 - betas[1]) * g * g
    return g, m, v


def adam(p, g, st, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, amsgrad=False,
         decoupled_weight_decay=False, **hp):
    beta1, beta2 = betas
    t = st["step"] = st.get("step", 0) + 1
    _, m, v = _adam_moments(p, g, st, lr, betas, decoupled_weight_decay, hp)
    if amsgrad:
        v = st["max_exp_avg_sq"] = torch.maximum(st.get("max_exp_avg_sq", 0 * p), v)
    m_hat = m / (1 - beta1 ** t)
    v_hat = v / (1 - beta2 ** t)
    p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def adamw(p, g, st, weight_decay=1e-2, **hp):
    adam(p, g, st, weight_decay=weight_decay, decoupled_weight_decay=True, **hp)


def adamax(p, g, st, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, **hp):
    beta1, beta2 = betas
    t = st["step"] = st.get("step", 0) + 1
    g = _regularize(p, g, hp)
    m = st["exp_avg"] = beta1 * st.get("exp_avg", 0 * p) + (1 - beta1) * g
    u = st["exp_inf"] = torch.maximum(beta2 * st.get("exp_inf", 0 * p), g.abs() + eps)
    p.sub_(lr / (1 - beta1 ** t) * m / u)


def rmsprop(p, g, st, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0, centered=False, **hp):
    st["step"] = st.get("step", 0) + 1
    g = _regularize(p, g, hp)
    v = st["square_avg"] = alpha * st.get("square_avg", 0 * p) + (1 - alpha) * g * g
    if centered:
        mean = st["grad_avg"] = alpha * st.get("grad_avg", 0 * p) + (1 - alpha) * g
        v = v - mean * mean
    update = g / (v.sqrt() + eps)
    if momentum > 0:
        update = st["momentum_buffer"] = momentum * st.get("momentum_buffer", 0 * p) + update
    p.sub_(lr * update)


def adagrad(p, g, st, lr=1e-2, lr_decay=0, initial_accumulator_value=0, eps=1e-10, **hp):
    t = st["step"] = st.get("step", 0) + 1
    g = _regularize(p, g, hp)
    acc = st["sum"] = st.get("sum", initial_accumulator_value + 0 * p) + g * g
    p.sub_(lr / (1 + (t - 1) * lr_decay) * g / (acc.sqrt() + eps))


def sgd(p, g, st, lr=1e-3, momentum=0, dampening=0, nesterov=False, **hp):
    g = _regularize(p, g, hp)
    if momentum != 0:
        if "momentum_buffer" not in st:
            buf = st["momentum_buffer"] = g.clone()
        else:
            buf = st["momentum_buffer"] = momentum * st["momentum_buffer"] + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    p.sub_(lr * g)


def adadelta(p, g, st, lr=1.0, rho=0.9, eps=1e-6, **hp):
    st["step"] = st.get("step", 0) + 1
    g = _regularize(p, g, hp)
    v = st["square_avg"] = rho * st.get("square_avg", 0 * p) + (1 - rho) * g * g
    delta = (st.get("acc_delta", 0 * p) + eps).sqrt() / (v + eps).sqrt() * g
    st["acc_delta"] = rho * st.get("acc_delta", 0 * p) + (1 - rho) * delta * delta
    p.sub_(lr * delta)


def rprop(p, g, st, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), **hp):
    st["step"] = st.get("step", 0) + 1
    g = _regularize(p, g, hp)
    prev = st.get("prev", 0 * p)
    size = st.get("step_size", torch.full_like(p, lr))
    s = torch.sign(g * prev)
    factor = torch.ones_like(p)  # in p's dtype (torch.where on two numbers: float32)
    factor[s > 0], factor[s < 0] = etas[1], etas[0]
    size = st["step_size"] = (size * factor).clamp(*step_sizes)
    g = st["prev"] = torch.where(s < 0, 0.0, g)
    p.sub_(torch.sign(g) * size)


def radam(p, g, st, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, decoupled_weight_decay=False,
          **hp):
    beta1, beta2 = betas
    t = st["step"] = st.get("step", 0) + 1
    _, m, v = _adam_moments(p, g, st, lr, betas, decoupled_weight_decay, hp)
    m_hat = m / (1 - beta1 ** t)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2 ** t / (1 - beta2 ** t)
    if rho_t > 5:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        p.sub_(lr * m_hat * rect * (1 - beta2 ** t) ** 0.5 / (v.sqrt() + eps))
    else:
        p.sub_(lr * m_hat)


def nadam(p, g, st, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, momentum_decay=4e-3,
          decoupled_weight_decay=False, **hp):
    beta1, beta2 = betas
    t = st["step"] = st.get("step", 0) + 1
    g, m, v = _adam_moments(p, g, st, lr, betas, decoupled_weight_decay, hp)
    mu = beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = beta1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    # torch multiplies in its scalar dtype (float32 unless the default is float64)
    prod = st["mu_product"] = float(torch.tensor(_scalar(st.get("mu_product", 1.0))) * mu)
    denom = (v / (1 - beta2 ** t)).sqrt() + eps
    p.sub_(lr * (1 - mu) / (1 - prod) * g / denom + lr * mu_next / (1 - prod * mu_next) * m / denom)


def _scalar(x):
    # torch keeps per-param scalar state (NAdam's mu_product, ASGD's eta and mu) in its
    # scalar dtype: float32 unless the default dtype is float64
    dt = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return float(torch.tensor(x, dtype=dt))


def asgd(p, g, st, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, **hp):
    # eta and mu are last step's: the update uses them, then they are moved
    t = st["step"] = st.get("step", 0) + 1
    eta, mu = st.get("eta", _scalar(lr)), st.get("mu", 1.0)
    g = _regularize(p, g, hp)
    p.mul_(1 - lambd * eta).sub_(eta * g)
    st["ax"] = p.clone() if mu == 1 else st["ax"] + mu * (p - st["ax"])
    st["eta"] = _scalar(lr / (1 + lambd * lr * t) ** alpha)
    st["mu"] = _scalar(1 / max(1, t - t0))


def lion(p, g, st, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, **hp):
    # Chen et al. (2023), Algorithm 2: the update is the sign of an interpolation of the
    # momentum and the gradient; the momentum then moves with beta2; decay decoupled
    beta1, beta2 = betas
    g = _regularize(p, g, hp, coupled=False)
    m = st.get("exp_avg", 0 * p)
    p.mul_(1 - lr * weight_decay).sub_(lr * torch.sign(beta1 * m + (1 - beta1) * g))
    st["exp_avg"] = beta2 * m + (1 - beta2) * g


def _norm(x):
    # summed exactly: a float64 reference of float64 norms must not carry the rounding of
    # one summation order (torch's or the engines')
    return math.sqrt(math.fsum((x * x).flatten().tolist()))


def adafactor(p, g, st, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
              dtype=torch.float32, **hp):
    # ``dtype``: the params' own (eps1's default is its machine epsilon)
    eps1 = torch.finfo(dtype).eps if eps[0] is None else eps[0]
    t = st["step"] = st.get("step", 0) + 1
    w = t ** beta2_decay
    alpha = max(eps[1], _norm(p) / p.numel() ** 0.5) * min(lr, t ** -0.5)
    p.mul_(1 - lr * weight_decay)
    g = _regularize(p, g, {**hp, "weight_decay": 0})
    if g.dim() > 1:
        r = st["row_var"] = (1 - w) * st.get("row_var", 0) + w * (g * g).mean(-1, keepdim=True)
        c = st["col_var"] = (1 - w) * st.get("col_var", 0) + w * (g * g).mean(-2, keepdim=True)
        v = r * c / r.mean(-2, keepdim=True).clamp(min=eps1)
    else:
        v = st["variance"] = (1 - w) * st.get("variance", 0) + w * g * g
    u = g / v.clamp(min=eps1 * eps1).sqrt()
    p.sub_(alpha / max(1.0, _norm(u) / (u.numel() ** 0.5 * d)) * u)


def algorithm(name):
    """The float64 step of the optimizer class named ``name`` (any case): its spec's
    ``reference`` (fusedopt/spec.py)."""
    from . import spec
    for cls_name, cls in spec.REGISTRY.items():
        if cls_name.lower() == name.lower():
            return cls.spec.reference
    raise KeyError(f"no optimizer named {name!r}; known: {', '.join(spec.REGISTRY)}")


def step(name, params, grads, states, **hp):
    """One step of algorithm ``name`` on float64 tensors; params without a grad are skipped."""
    hp = {k: v for k, v in hp.items() if k not in ("foreach", "fused", "capturable",
                                                   "differentiable", "backend")}
    fn = algorithm(name)
    for p, g, st in zip(params, grads, states):
        if g is None:
            continue
        assert p.dtype == torch.float64
        fn(p, g.to(torch.float64), st, **hp)


def step_8bit(name, params, grads, states, signed, nbits=8, **hp):
    """One step of ``name`` with 8-bit state (quant.py; 4-bit with ``nbits=4``): each
    state entry named in ``signed`` (name -> True for the signed map, False for the
    unsigned) is held as (codes, absmax) (codes one per element, unpacked), dequantized to
    float64, updated by the float64 step above, and quantized again with its new absmax.
    Params under quant.MIN_NUMEL elements keep float64 state.  The algorithm the engines'
    quantized state is to be checked against."""
    from . import quant
    maps = {k: quant.dynamic_map(s, nbits) for k, s in signed.items()}
    size = quant.block(nbits)
    for p, g, st in zip(params, grads, states):
        if g is None:
            continue
        small = p.numel() < quant.MIN_NUMEL
        for k, v in st.items():
            if isinstance(v, tuple):
                st[k] = quant.dequantize(*v, maps[k], torch.float64, size)
        step(name, [p], [g], [st], **hp)
        for k in maps:
            if k in st and not small:
                st[k] = quant.quantize(st[k], maps[k], size)
