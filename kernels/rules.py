"""Update rules: the math of each optimizer, written once.

Every rule has the same shape, so that one engine per backend can run any of them:

    rule(p, g, *state, *, coefficient, ...) -> (p, *state)

``p`` and ``g`` are one element of a parameter and of its gradient, ``state`` the
optimizer's state slots that the rule uses (at most three; the engines store only
those), and the keyword-only parameters are per-tensor coefficients that the optimizer
class computes in float64, hands over by name (its ``_coefficients``) and that are rounded
once to the math dtype, exactly where torch.optim rounds its Python scalars.  How the
names reach the engines: kernels/coefficients.py.
There are no float literals here: in Numba a literal promotes float32 math to float64
(slower, and no longer torch's arithmetic).

``ops`` and the UPPER-CASE flags are mere placeholders in this module: each engine
compiles a copy of these functions whose globals bind ``ops`` to its math library
(``numba_ops`` or ``triton_ops``: division and square root are ``ops.div`` and
``ops.sqrt`` because Triton's ``/`` on float32 is approximate; ``ops.fma`` is a fused
multiply-add, used exactly where torch's CPU kernels fuse: addcmul, lerp, add(alpha=)) and every flag to a compile-time
constant, so a flag costs nothing inside the element loop.

The order of operations follows torch 2.13's for-loop implementations
(``torch/optim/*.py``, ``_single_tensor_*``), so that float32 results match
``torch.optim.X(foreach=False)`` to the last bit wherever the arithmetic allows.
"""
# SCALE_GRAD, WRITE_GRAD, FOUND_INF and STOCH_ROUND belong to the engines, not the rules:
# SCALE_GRAD multiplies the gradient by the engines' grad_scale coefficient (GradScaler's
# 1 / scale, a clipping factor) before the rule and rounds it to the gradient's dtype;
# WRITE_GRAD stores it back, as torch's unscale would have; FOUND_INF (GPU) makes the
# launch read the scaler's found_inf flag and, if set, write nothing; STOCH_ROUND rounds
# bfloat16 params stochastically instead of to nearest.
# REDUCE belongs to the engines' matrix kernel (``run_matrix``): instead of storing, it sums
# the squares of the rule's first output per tensor and of its second per row and column;
# in the update kernels (``reduce``: Spec.trust), the products of the outputs p * a and
# b * c per tensor;
# SECOND tells a rule with two reduction passes which one runs.  ROW_LERP (with REDUCE)
# makes each row's sum a factor in slot a instead of an output: torch's
# lerp_(norm(g, dim=-1)**2 / count, w) with the engines' coefficients lerp_count, lerp_w
# and lerp_w_rest (count 0: the rows are a 1-D param's elements, lerp_(g**2, w)),
# Adafactor's row factor and variance.
FLAGS = ("L1", "AMSGRAD", "DECOUPLED",
         "CENTERED", "MOMENTUM", "NESTEROV", "SCALE_GRAD", "WRITE_GRAD", "FOUND_INF",
         "STOCH_ROUND", "REDUCE", "SECOND", "ROW_LERP")
# the names each engine's copy of the rules binds (numba_base.bind_rule, triton_base.bind_rule)
ops = None
(L1, AMSGRAD, DECOUPLED, CENTERED, MOMENTUM, NESTEROV,
 SCALE_GRAD, WRITE_GRAD, FOUND_INF, STOCH_ROUND, REDUCE, SECOND, ROW_LERP) = (False,) * len(FLAGS)


def lerp(start, end, w, w_rest):
    # torch's lerp: start + w * (end - start) when |w| < 0.5, else end - (end - start) * (1 - w),
    # each with one fused multiply-add; picked by the weight in the math dtype, as torch's
    # kernels pick it (a select, not a flag: groups of both kinds share one variant)
    small = ops.abs(w) < 0.5  # (one fma, its operands selected: the same bits)
    return ops.fma(ops.where(small, w, -w_rest), end - start, ops.where(small, start, end))


def regularize(p, g, wd, l1):
    # L2 (torch's weight_decay: g + wd * p where wd != 0, unless DECOUPLED), then L1
    # (g + l1 * sign(p)); maximize came first: the engines' adapter negates g
    # (coefficients.adapter).  Weight decay is a value, not a flag: groups with and
    # without it share one compiled variant (a select, exact: torch skips the add at 0)
    if not DECOUPLED:
        g = ops.where(wd != 0, ops.fma(wd, p, g), g)
    if L1:
        zero = l1 - l1
        g = g + ops.where(p > zero, l1, ops.where(p < zero, -l1, zero))
    return g


def adam_moments(p, g, m, v, w, w_rest, beta2, beta2_rest, wd, l1):
    # the Adam family's first half (Adam, AdamW, RAdam, NAdam): weight decay, decoupled
    # (p *= 1 - lr * wd, passed as `wd`) or L2, then torch's exp_avg.lerp_(g, 1 - beta1)
    # and exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if DECOUPLED:  # (wd is exactly 1 without weight decay: arith.decoupled)
        p = p * wd
    g = regularize(p, g, wd, l1)
    m = lerp(m, g, w, w_rest)
    v = ops.fma(beta2_rest * g, g, v * beta2)
    return p, g, m, v


def adam(p, g, m, v, vmax, *, step_size, bc2_sqrt, w, w_rest, beta2, beta2_rest, eps, wd,
         l1):
    p, g, m, v = adam_moments(p, g, m, v, w, w_rest, beta2, beta2_rest, wd, l1)
    d = v
    if AMSGRAD:
        vmax = ops.maximum(vmax, v)
        d = vmax
    denom = ops.div(ops.sqrt(d), bc2_sqrt) + eps
    p = p + ops.div(-step_size * m, denom)
    return p, m, v, vmax


def adamax(p, g, m, u, *, clr, w, w_rest, beta2, eps, wd, l1):
    g = regularize(p, g, wd, l1)
    m = lerp(m, g, w, w_rest)
    u = ops.maximum(u * beta2, ops.abs(g) + eps)
    p = p + ops.div(-clr * m, u)
    return p, m, u


def rmsprop(p, g, sq, buf, gavg, *, lr, alpha, alpha_rest, w_rest, eps, momentum, wd, l1):
    # alpha_rest = 1 - alpha is also the lerp weight of grad_avg (w_rest: 1 - that)
    g = regularize(p, g, wd, l1)
    sq = ops.fma(alpha_rest * g, g, sq * alpha)
    if CENTERED:
        gavg = lerp(gavg, g, alpha_rest, w_rest)
        avg = ops.sqrt(ops.fma(-gavg, gavg, sq)) + eps
    else:
        avg = ops.sqrt(sq) + eps
    if MOMENTUM:
        buf = buf * momentum + ops.div(g, avg)
        p = ops.fma(-lr, buf, p)
    else:
        p = p + ops.div(-lr * g, avg)
    return p, sq, buf, gavg


def adagrad(p, g, acc, *, clr, eps, wd, l1):
    g = regularize(p, g, wd, l1)
    acc = ops.fma(g, g, acc)
    p = p + ops.div(-clr * g, ops.sqrt(acc) + eps)
    return p, acc


def sgd(p, g, buf, *, lr, wd, l1, keep, take, momentum):
    # keep/take: momentum and 1 - dampening, or 0 and 1 on a buffer's first step, where
    # torch starts the buffer as a copy of the gradient (buf is zero then, so 0 * buf + g == g)
    g = regularize(p, g, wd, l1)
    if MOMENTUM:
        buf = ops.fma(take, g, buf * keep)
        if NESTEROV:
            g = ops.fma(momentum, buf, g)
        else:
            g = buf
    p = ops.fma(-lr, g, p)
    return p, buf


def nadam(p, g, m, v, *, w, w_rest, beta2, beta2_rest, bc2, eps, c_grad, c_avg, wd, l1):
    # torch's order: Adam's moments, denom = sqrt(v / bc2) + eps, then two addcdiv: the
    # gradient's share (c_grad) and the momentum's (c_avg), each rounded into p
    p, g, m, v = adam_moments(p, g, m, v, w, w_rest, beta2, beta2_rest, wd, l1)
    denom = ops.sqrt(ops.div(v, bc2)) + eps
    p = p + ops.div(c_grad * g, denom)
    p = p + ops.div(c_avg * m, denom)
    return p, m, v


def radam(p, g, m, v, *, lr, bc1, bc2_sqrt, w, w_rest, beta2, beta2_rest, eps, wd, l1,
          rect):
    # torch's order: Adam's moments, then p - (m / bc1) * lr * adaptive * rect where the
    # variance is tractable (rect > 0, computed per step on the host), else
    # p - (m / bc1) * lr; adaptive = bc2_sqrt / (sqrt(v) + eps) as torch's float / tensor
    # computes it: the reciprocal, then a product (bc1 / bc1 is an exact 1: no literals)
    p, g, m, v = adam_moments(p, g, m, v, w, w_rest, beta2, beta2_rest, wd, l1)
    step = ops.div(m, bc1) * lr
    adaptive = ops.div(ops.div(bc1, bc1), ops.sqrt(v) + eps) * bc2_sqrt
    rectified = step * adaptive * rect
    p = p - ops.where(rect > rect - rect, rectified, step)
    return p, m, v


def adadelta(p, g, sq, acc, *, lr, rho, rho_rest, eps, wd, l1):
    # torch's order: sq*rho + (1-rho)*g*g (addcmul), delta = sqrt(acc+eps) / sqrt(sq+eps)
    # then times g (two roundings), acc likewise, p - lr*delta (add with alpha)
    g = regularize(p, g, wd, l1)
    sq = ops.fma(rho_rest * g, g, sq * rho)
    delta = ops.div(ops.sqrt(acc + eps), ops.sqrt(sq + eps)) * g
    acc = ops.fma(rho_rest * delta, delta, acc * rho)
    p = ops.fma(-lr, delta, p)
    return p, sq, acc


def rprop(p, g, prev, step_size, *, etaplus, etaminus, lo, hi, one, wd, l1):
    # torch's order: sign(g * prev) mapped to etaplus / etaminus / 1 (NaN stays NaN),
    # step_size * that clamped to [lo, hi], g zeroed where the sign flipped, then
    # p - sign(g) * step_size (addcmul) and prev = g.  `one` stands for 1 (no literals)
    g = regularize(p, g, wd, l1)
    zero = one - one
    s = g * prev
    factor = ops.where(s > zero, etaplus, ops.where(s < zero, etaminus,
                                                    ops.where(s == zero, one, s)))
    step_size = step_size * factor
    step_size = ops.where(step_size < lo, lo, step_size)
    step_size = ops.where(step_size > hi, hi, step_size)
    g = ops.where(s < zero, zero, g)
    sign = ops.where(g > zero, one, ops.where(g < zero, -one, g))
    p = ops.fma(-sign, step_size, p)
    return p, g, step_size


def asgd(p, g, ax, *, decay, eta, mu, copy_at, wd, l1):
    # torch's order: p * (1 - lambd * eta) (decay, rounded), then p - eta * g (add with
    # alpha), then the average: a copy of p where mu == 1 (non-capturable torch copies),
    # else ax + (p - ax) * mu.  copy_at is 1, or NaN where torch always blends (capturable)
    g = regularize(p, g, wd, l1)
    p = ops.fma(-eta, g, p * decay)
    ax = ops.where(mu == copy_at, p, ax + (p - ax) * mu)
    return p, ax


def lion(p, g, m, *, decay, lr, beta1, beta1_rest, beta2, beta2_rest, one, l1):
    # lion-pytorch's order (fusedopt/lion.py): p * (1 - lr * wd), the sign of
    # m * beta1 + (1 - beta1) * g (add with alpha: fused), p - lr * sign (likewise), then
    # m * beta2 + (1 - beta2) * g.  Weight decay is decoupled (the DECOUPLED flag).  `one`
    # stands for 1 (no literals); the sign of 0 is 0, of NaN NaN, as torch's sign
    p = p * decay  # (exactly 1 without weight decay: arith.decoupled)
    g = regularize(p, g, decay, l1)
    zero = one - one
    c = ops.fma(beta1_rest, g, m * beta1)
    p = ops.fma(-lr, ops.where(c > zero, one, ops.where(c < zero, -one, c)), p)
    m = ops.fma(beta2_rest, g, m * beta2)
    return p, m


def ademamix(p, g, m, v, s, *, wd, l1, w, beta2, beta2_rest, w3, bc1, bc2_sqrt, eps, alpha,
             lr, one):
    # pytorch_optimizer's AdEMAMix (fusedopt/ademamix.py): Adam's moments, then the slow
    # one, s.lerp_(g, w3) (w3 = 1 - beta3 this step: torch's lerp picks its formula by
    # the weight, here too, without a flag), then p.addcdiv_(m / bc1 + alpha * s (add with
    # alpha), sqrt(v) / bc2_sqrt + eps, value=-lr).  `one` stands for 1 (no literals)
    p, g, m, v = adam_moments(p, g, m, v, w, one - w, beta2, beta2_rest, wd, l1)
    small = w3 < ops.div(one, one + one)
    s = ops.fma(ops.where(small, w3, w3 - one), g - s, ops.where(small, s, g))
    denom = ops.div(ops.sqrt(v), bc2_sqrt) + eps
    p = p + ops.div(-lr * ops.fma(alpha, s, ops.div(m, bc1)), denom)
    return p, m, v, s


def adafactor(p, g, row, col, mean, *, wd, l1, step_size, bound):
    # Run by the matrix kernel: row and mean are the element's row factor and its matrix's
    # clamped row-factor mean, col is 1 / sqrt(its column factor), computed per column on
    # the host (Adafactor._run); for a 1-D param: its variance, 1, 1.
    # torch's update is g * rsqrt(max(row * col / mean, eps1**2)) (a multiply, two
    # divisions and a square root per element, which bound a pass on a CPU).  Here it is
    # g * min(sqrt(mean / row) * col, bound): the same but for rounding, with the
    # division and square root per row (hoisted out of the columns' loop), two multiplies
    # and a min per element.  A 1-D param: g * min(1 / sqrt(variance), bound), torch's.
    # The first REDUCE pass sums p**2 (alpha) and g**2 per row and column (the factors);
    # the second (SECOND) sums update**2 (denom), the third adds the update: it is
    # recomputed each time rather than stored (it is as large as the param), the same
    # update in both, so the denominator is that of the update applied.  Then
    # p * (1 - lr * wd) and p + step_size * update (add with alpha: one fma),
    # step_size = -alpha / denom.
    g = regularize(p, g, wd, l1)
    # min(x, bound), a NaN of either kept (bound: torch's clamp of the variance at eps1**2,
    # Adafactor._bound; inf for none): where(b < x, b, x) keeps x's (one vminps on x86,
    # where -maximum(-x, -b) took two negations and four mask ops); b's (eps1 set to NaN
    # in a group: torch's clamp makes every update NaN) by a select on b alone
    x = ops.sqrt(ops.div(mean, row)) * col
    x = ops.where(bound != bound, bound, x)
    update = g * ops.where(bound < x, bound, x)
    out, sq = p, g
    if SECOND:
        out, sq = update, update
    if not REDUCE:  # (wd is exactly 1 without weight decay: arith.decoupled)
        out = ops.fma(step_size, update, p * wd)
    return out, sq, col, mean


def sf_interpolate(p, z, c, one):
    # torch's y.lerp_(z, c) with c this step's weight (schedule-free's ckp1, or a train() /
    # eval() swap's): its formula picked per value by |c| < 0.5, as torch picks it
    small = ops.abs(c) < ops.div(one, one + one)
    return ops.fma(ops.where(small, c, c - one), z - p, ops.where(small, p, z))


def schedulefree_adamw(p, g, z, v, *, beta2, beta2_rest, bc2, eps, wd, l1, ckp1, y_step, lr,
                       one):
    # the schedulefree package's AdamWScheduleFree (fusedopt/schedulefree.py), its order:
    # v.mul_(beta2).addcmul_(g, g, 1 - beta2), g / (sqrt(v / bc2) + eps), + wd * y (add
    # with alpha: at y, after the normalization), y.lerp_(z, ckp1), y += y_step * g (add
    # with alpha; y_step = lr * (beta1 * (1 - ckp1) - 1)), z -= lr * g.  DECOUPLED is set:
    # regularize leaves wd to this rule and does maximize and L1 on the raw gradient
    g = regularize(p, g, wd, l1)
    v = ops.fma(beta2_rest * g, g, v * beta2)
    g = ops.div(g, ops.sqrt(ops.div(v, bc2)) + eps)
    g = ops.where(wd != 0, ops.fma(wd, p, g), g)
    p = ops.fma(y_step, g, sf_interpolate(p, z, ckp1, one))
    z = ops.fma(-lr, g, z)
    return p, z, v


def schedulefree_sgd(p, g, z, *, wd, l1, ckp1, y_step, lr, one):
    # SGDScheduleFree's order: g + wd * y (coupled: regularize), y.lerp_(z, ckp1),
    # y += y_step * g, z -= lr * g (adds with alpha); y_step = lr * (momentum * (1 - ckp1) - 1)
    g = regularize(p, g, wd, l1)
    p = ops.fma(y_step, g, sf_interpolate(p, z, ckp1, one))
    z = ops.fma(-lr, g, z)
    return p, z


def schedulefree_swap(p, g, z, *, w, one):
    # train() / eval(): p.lerp_(z, w), w = 1 - beta1 (to y) or 1 - 1 / beta1 (to x); the
    # engines pass the param as g (never read)
    return sf_interpolate(p, z, w, one), z


def lamb(p, g, m, v, u, *, clip, wd, l1, beta1, beta3, beta2, beta2_rest, bc1, bc2, eps,
         step):
    # Apex FusedLAMB (fusedopt/lamb.py): g / clip (the global norm's factor), + wd * p in
    # L2 mode, m * beta1 + beta3 * g, v * beta2 + (1 - beta2) * g * g (multiply-adds),
    # u = (m / bc1) / (sqrt(v / bc2) + eps), + wd * p in AdamW mode (DECOUPLED); REDUCE:
    # |p|**2 and |u|**2 (the trust ratio's norms); else p - step * u, step = lr times the
    # ratio of this tensor (a coefficient per tensor).  Slot u is never stored
    g = regularize(p, ops.div(g, clip), wd, l1)
    m = ops.fma(beta3, g, m * beta1)
    v = ops.fma(beta2_rest * g, g, v * beta2)
    u = ops.div(ops.div(m, bc1), ops.sqrt(ops.div(v, bc2)) + eps)
    if DECOUPLED:
        u = ops.where(wd != 0, ops.fma(wd, p, u), u)
    if REDUCE:
        return p, p, u, u
    return ops.fma(-step, u, p), m, v, u


def lars(p, g, buf, x, y, *, wd, l1, ratio, adapt, momentum, take, lr):
    # pytorch_optimizer's LARS (fusedopt/lars.py): REDUCE: |p|**2 and |g|**2 (after
    # maximize); else, for a param of 2 or more dims (adapt = 1), (g + wd * p) * ratio
    # (add with alpha: fused), then momentum buf * momentum + (1 - dampening) * g, Nesterov
    # g + momentum * buf, and p - lr * g (each add with alpha).  DECOUPLED: regularize
    # leaves wd to this rule.  Slots x and y are never stored
    g = regularize(p, g, wd, l1)
    if REDUCE:
        return p, p, g, g
    g = ops.where(adapt != adapt - adapt, ops.fma(wd, p, g) * ratio, g)
    if MOMENTUM:
        buf = ops.fma(take, g, buf * momentum)
        if NESTEROV:
            g = ops.fma(momentum, buf, g)
        else:
            g = buf
    return ops.fma(-lr, g, p), buf, x, y


def stableadamw(p, g, m, v, x, *, w, beta2_hat, beta2_comp, eps_sq, eps, decay, lr, one, l1):
    # optimi's StableAdamW (fusedopt/stableadamw.py), its per-tensor order: m.lerp_(g, w)
    # (w = 1 - beta1_hat this step: the formula picked by the value, as torch's lerp),
    # v * beta2_hat + beta2_comp * g * g (addcmul); REDUCE: g**2 / max(v, eps**2), summed
    # (times one); else p * decay (1 - lr * wd, lr this tensor's RMS-clipped rate), then
    # p + (-lr * m) / (sqrt(v) + eps) (addcdiv).  Slot x is never stored
    g = regularize(p, g, decay, l1)
    small = w < ops.div(one, one + one)
    m = ops.fma(ops.where(small, w, w - one), g - m, ops.where(small, m, g))
    v = ops.fma(beta2_comp * g, g, v * beta2_hat)
    if REDUCE:
        r = ops.div(g * g, ops.maximum(v, eps_sq))
        return r, one, r, one
    p = p * decay  # (exactly 1 without weight decay: arith.decoupled)
    return p + ops.div(-lr * m, ops.sqrt(v) + eps), m, v, x


def muon_momentum(u, g, buf, *, w, m, one):
    # Muon's pre-pass (fusedopt/muon.py), run with each param's place in its update stack
    # (fusedopt/stacked.py) as `u`: torch's buf.lerp_(g, 1 - momentum) (w), then the
    # update, g.lerp(buf, momentum) (m) under NESTEROV, else buf; each lerp's formula
    # picked by its weight as torch picks it (sf_interpolate)
    buf = sf_interpolate(buf, g, w, one)
    u = buf
    if NESTEROV:
        u = sf_interpolate(g, buf, m, one)
    return u, buf


def muon_update(p, o, *, decay, step):
    # Muon's post-pass, run with the orthogonalized update as `o`: torch's
    # p.mul_(1 - lr * wd) (decay: always, as torch), p.add_(o, alpha=-adjusted_lr) (one fma)
    return ops.fma(step, o, p * decay)


def scale(p, g, *, factor):
    # not an optimizer: clip_grad_norm_'s multiply, run with the gradients as `p`
    return p * factor


RULES = {f.__name__: f for f in (adam, adamax, rmsprop, adagrad, sgd, adadelta, rprop, radam,
                                  nadam, asgd, lion, adafactor, ademamix, schedulefree_adamw,
                                  schedulefree_sgd, schedulefree_swap, lamb, lars, stableadamw,
                                  muon_momentum, muon_update, scale)}
HELPERS = (lerp, regularize, adam_moments, sf_interpolate)
