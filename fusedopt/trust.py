"""What the trust-ratio algorithms (Spec.trust: ``LAMB``, ``LARS``, ``StableAdamW``) share
beyond FusedOptimizer: the refusal of quantized state (the reduce pass reads float slots),
the per-tensor norms from the reduce pass's sums, a step counter in ``group["step"]``
(their packages keep no per-param ``"step"``), and a twin's own clipping by the global
gradient norm (Apex FusedLAMB's ``max_grad_norm``, ``_own_clip``): its factors computed
once per step over every group's gradients, before the first param is stepped, and handed
to the update (the rule's ``clip`` coefficient) and to the twin's fallback step.

A layer above optimizer.py and below the algorithms' modules: like FusedOptimizer it reads
what the class declares (its hooks), and imports nothing of theirs.
"""
import torch

from . import clip
from .dtensor import local
from .matrix import exact_sqrt
from .optimizer import FusedOptimizer


class TrustOptimizer(FusedOptimizer):
    """Base of a Spec.trust class: ``class LAMB(TrustOptimizer, LAMBForLoop)``.

    Besides FusedOptimizer's hooks a subclass defines ``_trust`` (the per-tensor
    coefficients from the reduce pass's sums; ``_norms`` reads them as two norms). The
    counter: ``_begin_group(group)`` is this step's count (kept as ``self._t``) before the
    group is stepped, ``_end_group(group)`` moves it after; by default an int in
    ``group["step"]`` from 0. Where the twin's ``max_grad_norm`` clips by the global norm
    (``_own_clip``), the twin defines ``_clip_factors(grads, inv)`` (its divisor of each
    group's gradients, from ``self._total_norm(grads) * inv``) and its step takes
    ``self._given_clips`` where set; the update reads a group's factor as ``_clip(group)``.
    """
    _has_step = False  # the counter is group["step"], as the packages'
    _clips = {}  # _own_clip: this step's factors, by the id of the group's params list

    def __init__(self, *args, state_dtype=None, **kwargs):
        # (after FusedOptimizer's differentiable=True error, which it raises first)
        if state_dtype in (torch.uint8, torch.uint4) and not kwargs.get("differentiable"):
            raise ValueError(f"fusedopt.{type(self).__name__} does not support state_dtype="
                             f"{state_dtype} (quantized state): its reduce pass reads float "
                             "state")
        super().__init__(*args, state_dtype=state_dtype, **kwargs)

    def _trust(self, group, bucket, sums, coeffs):
        """``coeffs`` with the per-tensor ones made from ``sums`` (bucket.reduce's: a row
        per tensor, the sums of the rule's products p * a and b * c)."""
        raise NotImplementedError

    @staticmethod
    def _norms(bucket, sums):
        """|p| and the rule's second norm (|update|, |g|) of each tensor: the square roots
        of the reduce pass's float64 sums of squares, correctly rounded to the math dtype."""
        dt = torch.float64 if bucket.dtype == "float64" else torch.float32
        return tuple(exact_sqrt(sums[:, k]).to(dt) for k in (0, 1))

    def _step_group(self, group, amp=(None, None, False), plans=None):
        self._t = self._begin_group(group)
        super()._step_group(group, amp, plans)  # (the fallback's twin counts on a copy)
        self._end_group(group)

    def _begin_group(self, group):
        return group.get("step", 0) + 1

    def _end_group(self, group):
        group["step"] = group.get("step", 0) + 1

    def _eager_step(self):
        if self._own_clip:
            self._clips = self._own_clips()
        super()._eager_step()

    def _own_clips(self):
        # the lists renewed first: after group["params"] was reassigned (or a group deleted)
        # the global norm is over the params the groups hold now, as the twin's
        self._current_lists()
        live = self._with_grads()
        if any(p.grad.is_sparse for p in live):
            raise RuntimeError(self._sparse_error)
        scale = getattr(self, "grad_scale", None)  # GradScaler's: the unscaled grads' norm
        inv = 1.0 if scale is None else scale.double().reciprocal().float()
        # (by the params' list: _run may hand _coefficients a copy of the group)
        return {id(g["params"]): c for g, c in zip(
            self.param_groups, self._clip_factors([p.grad for p in live], inv))}

    def _total_norm(self, grads):
        # the twin's global norm by the engines: each tensor's norm correctly rounded
        return clip.total_norm(grads, 2.0, self._backend, exact=True)

    def _clip(self, group):
        """This step's factor of ``group``'s gradients (_own_clip; 1 without). Under FSDP2
        a replicated DTensor, the same on every rank: the engines take its local value."""
        return local(self._clips.get(id(group["params"]), 1.0))

    def _torch_step(self, group, params, *amp):
        if not self._own_clip:
            return super()._torch_step(group, params, *amp)
        # the params the engines do not take, stepped by the twin: with this step's clip
        # factor (the global norm is every param's, not theirs alone)
        self._given_clips = [self._clips.get(id(group["params"]), 1.0)]
        try:
            super()._torch_step(group, params, *amp)
        finally:
            self._given_clips = None
