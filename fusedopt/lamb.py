"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes"): Adam's update scaled per tensor by the trust ratio |p| / |update|, as NVIDIA
Apex's ``FusedLAMB`` has it (``apex.optimizers.FusedLAMB``, its ``multi_tensor_lamb``
kernel), which torch lacks.  Apex needs CUDA extensions that do not build here, so
``LAMBForLoop`` is written from its algorithm: its constructor, defaults and errors, the
state (``exp_avg``, ``exp_avg_sq``; the counter in ``group["step"]``, an int), and the
step in torch ops: the global gradient norm over every param, the grads divided by
norm / max_grad_norm past max_grad_norm, Adam's moments (bias-corrected where asked),
the update ``m_hat / (sqrt(v_hat) + eps)`` plus ``weight_decay * p`` (AdamW mode; in L2
mode added to the gradient first), and ``p -= lr * ratio * update`` with the ratio
``|p| / |update|`` (1 where either is 0) applied where ``weight_decay != 0`` or
``use_nvlamb``; float16 and bfloat16 params take that math in float32, as Apex's kernel
does (its ``MATH_T``), the state kept in the param's dtype.  ``LAMB`` is the fused step:
one reduce pass for both norms of every tensor, one update pass (Spec.trust).

Differences from Apex: the norms are correctly rounded (float64 sums of squares, rounded
once to the math dtype: Apex sums in float32 blocks); float64 and bfloat16 params are
stepped (Apex raises); ``p.grad`` is left as it was (Apex writes the update into it, so
its float16 params' update norm is of the update rounded to float16: here it is not); a
group's own ``max_grad_norm``, ``adam_w_mode``, ``use_nvlamb`` and ``maximize`` keys
override the constructor's (Apex reads the constructor's alone), and ``max_grad_norm=0``
means no clipping; fusedopt's own ``max_grad_norm`` keyword is Apex's here.
"""
import torch

from .optimizer import closure_loss
from .options import signature_with
from .reference import _regularize
from .spec import Spec
from .trust import TrustOptimizer

_SPARSE = "FusedLAMB does not support sparse gradients, please consider SparseAdam instead"
_DTYPES = (torch.float16, torch.float32, torch.float64, torch.bfloat16)


def math_dtype(p):
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def norm(x, dt):
    """|x| correctly rounded to ``dt``: the squares summed in float64 (exact for float32)."""
    return x.detach().double().square().sum().sqrt().to(dt)


class LAMBForLoop(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6,
                 weight_decay=0.01, amsgrad=False, adam_w_mode=True, grad_averaging=True,
                 set_grad_none=True, max_grad_norm=1.0, use_nvlamb=False, foreach=None):
        if amsgrad:
            raise RuntimeError("FusedLAMB does not support the AMSGrad variant.")
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas,
                                      eps=eps, weight_decay=weight_decay,
                                      grad_averaging=grad_averaging,
                                      max_grad_norm=max_grad_norm))
        self.adam_w_mode, self.set_grad_none = 1 if adam_w_mode else 0, set_grad_none
        self.use_nvlamb = use_nvlamb  # (foreach: accepted for the harnesses, unused)

    def _total_norm(self, grads):
        # torch.nn.utils.get_total_norm's form (the norm of the tensors' norms), each
        # tensor's norm correctly rounded, as the engines' (Apex: float32 sums); a grad
        # that is not floating point raises torch's error there, as get_total_norm's and
        # the fused step's (norm() would cast it and go on)
        for g in grads:
            if not (g.is_floating_point() or g.is_complex()):
                torch.linalg.vector_norm(g)
        return torch.linalg.vector_norm(torch.cat([norm(g, math_dtype(g)).reshape(1)
                                                   for g in grads]))

    def _clip_factors(self, grads, inv=1.0):
        """Per group: Apex's divisor of the gradients, norm / max_grad_norm where the global
        norm of ``grads`` (torch.nn.utils.get_total_norm's: every param's, every group's;
        times ``inv``, GradScaler's 1 / scale) passes the group's max_grad_norm (> 0), else
        1 (the fused step's too: trust.TrustOptimizer)."""
        want = [g.get("max_grad_norm", self.defaults["max_grad_norm"]) for g in self.param_groups]
        if not grads or not any(m > 0 for m in want):
            return [1.0] * len(want)
        total = self._total_norm(grads) * inv
        return [torch.where(total > m, total / m, 1.0) if m > 0 else 1.0 for m in want]

    def _mode(self, group):
        return bool(group.get("adam_w_mode", self.adam_w_mode)), \
            bool(group.get("use_nvlamb", self.use_nvlamb))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        live = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in live):
            raise RuntimeError(_SPARSE)
        if any(p.dtype not in _DTYPES for p in live):
            raise RuntimeError("FusedLAMB only support fp16 and fp32.")
        clips = getattr(self, "_given_clips", None) or \
            self._clip_factors([p.grad for p in live])  # (the fused step's, for its fallback)
        for group, c in zip(self.param_groups, clips):
            group["step"] = t = group.get("step", 0) + 1
            (b1, b2), wd, eps = group["betas"], group["weight_decay"], group["eps"]
            bc1, bc2 = (1 - b1 ** t, 1 - b2 ** t) if group["bias_correction"] else (1.0, 1.0)
            beta3 = 1 - b1 if group["grad_averaging"] else 1.0
            adamw, nvlamb = self._mode(group)
            for p in [p for p in group["params"] if p.grad is not None]:
                st = self.state[p]
                if not st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                # float16/bfloat16: the math in float32, each tensor rounded once on its
                # store (Apex's MATH_T): a (1 - beta2) g^2 that float16 would flush to 0
                # makes an update of m / eps, which the trust ratio spreads over the tensor
                dt = math_dtype(p)
                x = p.to(dt)
                g = (-p.grad if group.get("maximize", False) else p.grad).to(dt)
                g = g / c if torch.is_tensor(c) else g
                if not adamw and wd != 0:
                    g = g.add(x, alpha=wd)
                m, v = st["exp_avg"].to(dt), st["exp_avg_sq"].to(dt)
                m.mul_(b1).add_(g, alpha=beta3)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                u = m.div(bc1).div_(v.div(bc2).sqrt_().add_(eps))
                if adamw and wd != 0:
                    u.add_(x, alpha=wd)
                step = torch.tensor(group["lr"], dtype=dt)
                pn, un = norm(x, dt), norm(u, dt)
                if (wd != 0 or nvlamb) and pn != 0 and un != 0:
                    step = step * (pn / un)
                for t, new in ((st["exp_avg"], m), (st["exp_avg_sq"], v)):
                    if t is not new:  # (a float32 copy: the state takes it back, rounded)
                        t.copy_(new)
                if x is p:
                    p.add_(u, alpha=-step.item())
                else:
                    p.copy_(x.add_(u, alpha=-step.item()))
        return loss


def reference(p, g, st, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6,
              weight_decay=0.01, grad_averaging=True, adam_w_mode=True, use_nvlamb=False,
              maximize=False, **hp):
    """The paper's Algorithm 2 (LAMB) in float64, per tensor, as Apex applies it; no
    gradient clipping here (parity runs it with max_grad_norm=0)."""
    b1, b2 = betas
    t = st["step"] = st.get("step", 0) + 1
    g = _regularize(p, g, dict(hp, maximize=maximize, weight_decay=weight_decay),
                    coupled=not adam_w_mode)
    m = st["exp_avg"] = b1 * st.get("exp_avg", 0 * p) + (1 - b1 if grad_averaging else 1) * g
    v = st["exp_avg_sq"] = b2 * st.get("exp_avg_sq", 0 * p) + (1 - b2) * g * g
    c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if bias_correction else (1, 1)
    u = (m / c1) / ((v / c2).sqrt() + eps) + (weight_decay * p if adam_w_mode else 0)
    pn, un = p.norm(), u.norm()
    ratio = pn / un if (weight_decay != 0 or use_nvlamb) and pn > 0 and un > 0 else 1
    p.sub_(lr * ratio * u)


class LAMB(TrustOptimizer, LAMBForLoop):
    """LAMB (You et al., 2020), a drop-in for NVIDIA Apex's ``FusedLAMB``: ``lr=1e-3,
    bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, amsgrad=False,
    adam_w_mode=True, grad_averaging=True, set_grad_none=True, max_grad_norm=1.0,
    use_nvlamb=False``, Apex's errors and state (``exp_avg``, ``exp_avg_sq``; the counter
    in ``group["step"]``). Adam's update scaled per tensor by |p| / |update| (where
    ``weight_decay != 0`` or ``use_nvlamb``), the gradients first clipped by their global
    norm past ``max_grad_norm`` (Apex's). Per (device, dtype) group: one engine pass
    summing both norms of every tensor, one update pass (Numba on CPU, Triton on CUDA).
    Differences from Apex: ``fusedopt.lamb``'s module text. Extra keyword-only
    arguments: ``backend``, ``l1``, ``master_weights``, ``stochastic_rounding``, ``flat``,
    ``state_dtype`` (float32; 8-bit state is refused): the Options page
    (``docs/options.md``)."""
    _rule = "lamb"
    _own_clip = True  # max_grad_norm is Apex's: its clipping (trust.TrustOptimizer)
    # its clipping by the global norm (Apex's default max_grad_norm=1.0) needs every gradient
    # before the first param is stepped: gradient release has none to read
    _refuses = ("gradient_release",)
    _sparse_error = _SPARSE
    _OWN = TrustOptimizer._OWN + ("adam_w_mode", "set_grad_none", "use_nvlamb")

    def _slots(self, group):
        return ("exp_avg", "exp_avg_sq", None)

    def _flags(self, group):
        return {"DECOUPLED": self._mode(group)[0]}

    def _coefficients(self, group, step, f64):
        t, (b1, b2), wd = group.get("step", 0) + 1, group["betas"], group["weight_decay"]
        bc = (1 - b1 ** t, 1 - b2 ** t) if group["bias_correction"] else (1.0, 1.0)
        return dict(clip=self._clip(group), wd=wd, l1=group["l1"], beta1=b1,
                    beta3=1 - b1 if group["grad_averaging"] else 1.0, beta2=b2,
                    beta2_rest=1 - b2, bc1=bc[0], bc2=bc[1], eps=group["eps"],
                    step=group["lr"])

    def _trust(self, group, bucket, sums, co):
        pn, un = self._norms(bucket, sums)
        lr = torch.as_tensor(group["lr"], dtype=pn.dtype, device=pn.device)
        use = (pn != 0) & (un != 0) & (group["weight_decay"] != 0 or self._mode(group)[1])
        return {**co, "step": torch.where(use, lr * (pn / un), lr)}

    spec = Spec(reference=reference, source="apex.optimizers.FusedLAMB",
                cases=(dict(max_grad_norm=0.0), dict(max_grad_norm=0.0, adam_w_mode=False),
                       dict(max_grad_norm=0.0, use_nvlamb=True, bias_correction=False,
                            grad_averaging=False)),
                group_hp=(dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99)),
                          dict(lr=2e-3, betas=(0.3, 0.9)), dict(lr=1e-2, eps=1e-4)),
                fp16_eps=True, test_hp=dict(lr=1e-2, weight_decay=0.1, max_grad_norm=0.0),
                program_hp=dict(lr=1e-2), bench_hp=dict(lr=1e-3),
                unsigned=frozenset({"exp_avg_sq"}), traffic=((4, 0), (4, 3)), complex_params=False,
                ulp=64,
                trust=True, aot=(dict(L1=True), 3))


LAMB.__signature__ = signature_with(LAMBForLoop)
