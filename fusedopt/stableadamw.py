"""StableAdamW (Wortsman et al., 2023, "Stable and low-precision training for large-scale
vision-language models"): AdamW with debiased betas whose learning rate is divided per
tensor by max(1, RMS(g**2 / max(v, eps**2))), as optimi has it (``optimi.StableAdamW``,
torch-optimi 0.3), which torch lacks.  ``StableAdamWForLoop`` is optimi's per-tensor step
in torch ops and its constructor (``lr`` required), errors and state (``exp_avg``,
``exp_avg_sq``, ``eps_sq``, ``kahan_comp``; the counter in ``group["step"]``, an int32
tensor).  ``StableAdamW`` is the fused step: one reduce pass for every tensor's RMS, one
update pass (Spec.trust).

Differences from optimi: ``kahan_sum=True``, ``foreach=True``, ``triton=True`` and
``gradient_release=True`` are refused by name (use ``master_weights`` or
``stochastic_rounding`` for low-precision params); ``kahan_sum=None`` (optimi: Kahan
summation for float16/bfloat16 params) means none; the RMS's mean is correctly rounded
(a float64 sum: optimi's float32 ``mean()`` sums in float32).
"""
import torch

from .arith import decoupled
from .matrix import exact_sqrt
from .optimizer import closure_loss
from .options import signature_with
from .reference import _regularize
from .spec import Spec
from .trust import TrustOptimizer

_REFUSED = ("kahan_sum", "foreach", "triton", "gradient_release")


def debias_beta(beta, step):
    """optimi's (beta**t - beta) / (beta**t - 1): beta debiased into the moving average."""
    return (beta ** step - beta) / (beta ** step - 1)


def decay(group, lr):
    """optimi's factor of p: 1 - lr * wd, or 1 - (lr / max_lr) * wd (decouple_lr)."""
    wd = group["weight_decay"]
    return decoupled(lr / group["max_lr"] if group["decouple_lr"] else lr, wd)


class StableAdamWForLoop(torch.optim.Optimizer):
    def __init__(self, params, lr, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6,
                 decouple_lr=False, max_lr=None, kahan_sum=None, foreach=None, triton=None,
                 gradient_release=False):
        for k, v in zip(_REFUSED, (kahan_sum, foreach, triton, gradient_release)):
            if v:
                raise ValueError(f"fusedopt.StableAdamW does not support {k}={v!r}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta1 parameter: betas[0]={betas[0]!r}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta2 parameter: betas[1]={betas[1]!r}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon: eps={eps!r}")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: lr={lr}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight decay: weight_decay={weight_decay}")
        max_lr = lr if decouple_lr and max_lr is None else max_lr
        if max_lr is not None and not 0.0 <= max_lr:
            raise ValueError(f"Invalid maximum learning rate: max_lr={max_lr}")
        super().__init__(params, dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps,
                                      weight_decay=weight_decay, decouple_lr=decouple_lr,
                                      max_lr=max_lr, kahan_sum=kahan_sum, foreach=foreach,
                                      triton=False, gradient_release=False, setup=False))

    def _prepare(self, group):
        """optimi's state of the group's params with gradients, made as optimi makes it,
        and this step's count (optimi's int32 counter in group["step"], made at the first
        step); the counter moves by ``_count`` after the step (replaced, not in place: a
        copy of the group counts apart)."""
        for p in group["params"]:
            if p.grad is not None and "kahan_comp" not in self.state[p]:
                self._optimi_state(group, p, self.state[p])
        if not group["setup"]:
            group["setup"], group["step"] = True, torch.tensor(0, dtype=torch.int32)
        return int(group["step"].numpy()) + 1  # (a CPU tensor's value, no op)

    def _count(self, group):
        group["step"] = group["step"] + 1

    def _optimi_state(self, group, p, state):
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["eps_sq"] = torch.tensor(group["eps"] ** 2, dtype=p.dtype, device=p.device)
        state["kahan_comp"] = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            t = self._prepare(group)
            self._count(group)
            w, b2 = 1 - debias_beta(group["beta1"], t), debias_beta(group["beta2"], t)
            for p in live:
                st, g = self.state[p], -p.grad if group.get("maximize") else p.grad
                st["exp_avg"].lerp_(g, weight=w)
                v = st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                rms = g.pow(2).div_(v.maximum(st["eps_sq"])).mean().sqrt()
                lr = group["lr"] / max(1, rms.item())
                if group["weight_decay"] != 0:
                    p.mul_(decay(group, lr))
                p.addcdiv_(st["exp_avg"], v.sqrt().add_(group["eps"]), value=-lr)
        return loss


def reference(p, g, st, lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6,
              decouple_lr=False, max_lr=None, maximize=False, **hp):
    """The paper's Algorithm 1 (StableAdamW) in float64: debiased betas, the update's rate
    divided by max(1, RMS(g**2 / max(v, eps**2))), decoupled weight decay (optimi's)."""
    t = st["step"] = st.get("step", 0) + 1
    b1, b2 = (debias_beta(b, t) for b in betas)
    g = _regularize(p, g, dict(hp, maximize=maximize), coupled=False)
    m = st["exp_avg"] = b1 * st.get("exp_avg", 0 * p) + (1 - b1) * g
    v = st["exp_avg_sq"] = b2 * st.get("exp_avg_sq", 0 * p) + (1 - b2) * g * g
    rms = (g * g / v.clamp(min=eps * eps)).mean().sqrt().item() if p.numel() else 0.0
    lr = lr / max(1.0, rms)
    wd = weight_decay * (lr / (max_lr or lr) if decouple_lr else lr)
    p.mul_(1 - wd).sub_(lr * m / (v.sqrt() + eps))


class StableAdamW(TrustOptimizer, StableAdamWForLoop):
    """StableAdamW (Wortsman et al., 2023), a drop-in for ``optimi.StableAdamW``: ``lr``
    (required), ``betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6, decouple_lr=False,
    max_lr=None``, optimi's errors and state (``exp_avg``, ``exp_avg_sq``, ``eps_sq``,
    ``kahan_comp``; the counter in ``group["step"]``). AdamW with debiased betas, each
    tensor's rate divided by max(1, RMS(g**2 / max(v, eps**2))). Per (device, dtype)
    group: one engine pass for every tensor's RMS, one update pass (Numba on CPU, Triton
    on CUDA). ``kahan_sum``, ``foreach``, ``triton``, ``gradient_release`` are refused
    by name. Extra keyword-only arguments: ``backend``, ``l1``, ``max_grad_norm``,
    ``master_weights``, ``stochastic_rounding``, ``flat``, ``state_dtype`` (float32; 8-bit
    state is refused): the Options page (``docs/options.md``)."""
    _rule = "stableadamw"
    # optimi's state and int32 counter, made and moved as the twin's
    _begin_group, _end_group = StableAdamWForLoop._prepare, StableAdamWForLoop._count
    _refuses = ("kahan_sum", "gradient_release")  # optimi's own keywords: refused when on
    _sparse_error = "StableAdamW does not support sparse gradients"

    def _slots(self, group):
        return ("exp_avg", "exp_avg_sq", None)

    def _flags(self, group):
        return {"DECOUPLED": True}

    @staticmethod
    def _state_shape(name, p):
        return torch.Size() if name == "eps_sq" else p.shape

    def _inplace_updates(self, group):
        return 2 if group["weight_decay"] != 0 else 1

    def _run(self, bucket, group, gptr, amp):
        # optimi's max(v, eps_sq) reads each param's state eps_sq (a user may replace it):
        # read here every step, one value per tensor (nothing cached)
        self._eps_sq = torch.stack([self.state[p]["eps_sq"] for p in bucket.params]).to(
            bucket.C.device, bucket.C.dtype)
        return super()._run(bucket, group, gptr, amp)

    def _coefficients(self, group, step, f64):
        t = getattr(self, "_t", 1)
        w, b2 = 1 - debias_beta(group["beta1"], t), debias_beta(group["beta2"], t)
        return dict(w=w, beta2_hat=b2, beta2_comp=1 - b2, eps=group["eps"], one=1.0,
                    eps_sq=self._eps_sq, decay=1.0, lr=group["lr"], l1=group["l1"])

    def _trust(self, group, bucket, sums, co):
        dt = torch.float64 if bucket.dtype == "float64" else torch.float32
        n = torch.as_tensor(bucket.whole, device=sums.device).to(dt)
        rms = exact_sqrt(sums[:, 0].to(dt) / n).double()
        lr = group["lr"] / torch.where(rms > 1, rms, 1.0)
        return {**co, "lr": lr, "decay": decay(group, lr)}

    spec = Spec(reference=reference, source="optimi.StableAdamW",
                cases=({}, dict(decouple_lr=True, max_lr=2e-2)),
                group_hp=(dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.9)),
                          dict(lr=2e-3, betas=(0.3, 0.999)), dict(lr=1e-2, eps=1e-4)),
                fp16_eps=True, test_hp=dict(lr=1e-2, weight_decay=0.1),
                # (optimi's default picks its Triton kernels wherever Triton is installed,
                # which fail on a CPU: its per-tensor path, its default without Triton)
                program_hp=dict(lr=1e-2), bench_hp=dict(lr=1e-3, triton=False),
                unsigned=frozenset({"exp_avg_sq"}), traffic=((4, 0), (4, 3)), complex_params=False,
                trust=True, ulp=64, aot=(dict(DECOUPLED=True, L1=True), 3))


StableAdamW.__signature__ = signature_with(StableAdamWForLoop)
