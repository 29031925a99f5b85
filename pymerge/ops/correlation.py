"""Streaming feature statistics of two models: means, stds, covariance, Pearson correlation.

Activation matching, ZipIt!, REPAIR and RegMean all need, over the same N inputs, the
per-feature means/stds of model A's ``d_a`` features and model B's ``d_b`` features and the
``[d_a, d_b]`` cross-covariance / correlation (ZipIt!: the joint ``(d_a + d_b)^2`` one;
RegMean: one model's Gram matrix). :class:`CorrelationAccumulator` collects them batch by
batch; :func:`correlation` is the one-shot form.

Numerics
--------
Each batch is reduced around a per-feature *shift* ``k`` (the running mean; for the first
batch its own mean): ``s = sum(x - k)``, ``q = sum((x - k)^2)``, ``P = (x_a - k_a)^T (x_b - k_b)``.
The batch co-moment ``M2_B = P - s_a s_b^T / n_B`` is then merged with Chan et al.'s parallel
update ``M2 = M2_A + M2_B + (n_A n_B / n) d_a d_b^T`` (``d`` = difference of the means); the
per-feature means and ``M2`` go through the library's one per-feature merge,
:func:`pymerge.ops.moments.chan_merge`. No
quantity of size ``N * mean^2`` is ever formed, so float32 accumulators stay accurate when
``|mean| >> std`` (the naive ``E[xy] - E[x]E[y]`` loses everything at ``|mean|/std ~ 1e3``).

Measured errors of :meth:`correlation` against float64 statistics of the same (rounded)
inputs, max abs over entries (correlations lie in ``[-1, 1]``), N = 512..4096:

* torch path (any input dtype; computed in the accumulator dtype): about 1e-7, and about
  1e-6 with ``|mean| / std = 1e3`` (the naive formula: 1e-1).
* Triton kernel: float32 inputs about 1e-7 (3e-6 at ``|mean| / std = 1e3``); fp16 about
  2e-4 and bf16 about 1e-3, because the centred operand is rounded to the input dtype for
  the tensor cores (the shift is rounded to that dtype too, so where ``|mean| >> std`` the
  centring is exact and the error stays about 1e-5). ``allow_tf32=True`` costs about 1e-3.
* ``dtype=torch.float64`` keeps the running statistics (and the whole torch path) in
  float64 (about 1e-15 on the torch path); the Triton kernel still accumulates each batch
  in float32.

The tests assert 1e-5 (float32), 5e-3 (fp16), 3e-2 (bf16) on small batches.

Conventions
-----------
* Samples: ``[N, d]``; ``[N, T, d]`` (sequences: features last) flattens ``N*T``;
  ``[N, C, H, W]`` (and any ``ndim >= 4``: features in dim 1, e.g. conv maps, any memory
  format) treats every spatial position as a sample. ``feature_dim=`` overrides the rule
  (e.g. ``feature_dim=1`` for conv1d ``[N, C, L]``).
* Zero-variance features (exactly constant, or constant up to the rounding of the shift)
  get correlation 0 with everything, including themselves.
* ``covariance``/``var``/``std`` use ``ddof=1`` by default (like ``numpy.cov``/``torch.cov``);
  pass ``ddof=0`` for the population statistics.
* Non-finite inputs: with ``check_finite=True`` (default) ``update`` raises ``ValueError``
  and leaves the accumulator unchanged; this costs one extra read of the batch and a device
  sync per update on GPU. With ``check_finite=False`` NaN/inf propagate into the statistics
  of the features they touch.
* Overflow: finite features whose squares or products overflow the accumulator dtype (float32
  features beyond about 1e19 in magnitude, fewer for large batches) would turn every
  statistic they touch into inf/NaN. With ``check_finite=True`` ``update`` checks the
  batch's sums of squared deviations and the merged per-feature moments and raises
  ``ValueError`` (suggesting ``dtype=torch.float64``) before the accumulator changes (on
  the Triton path with float32 statistics the kernel has already added the batch's cross
  products, so the accumulator refuses every later call until :meth:`reset`); results
  (:meth:`correlation`, :meth:`covariance`, :meth:`gram`) check the co-moment too.
* Inputs are never modified; they are detached (statistics are not differentiable).
* Memory: the torch path keeps two work buffers of ``N_batch x (d_a + d_b)`` in the
  accumulator dtype between updates (fresh multi-MB allocations page-fault on every
  batch); :meth:`CorrelationAccumulator.reset` frees them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pymerge._backend import choose_kernels
from pymerge.ops.moments import chan_merge

__all__ = ["CorrelationAccumulator", "correlation"]

_UNCHANGED = " (the accumulator was not updated)"
_BROKEN = (
    " (the batch's cross products were already added on the Triton path: reset() the accumulator)"
)

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# features whose std is below this many compute-epsilons times |mean| count as constant
_ZERO_VAR_ULPS = 32.0


def _as_samples(x: Any, name: str, feature_dim: int | None) -> torch.Tensor:
    """Validate ``x`` and view it as ``[samples, features]`` (no copy when possible)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; expected a floating dtype "
            "(float16, bfloat16, float32 or float64)"
        )
    x = x.detach()
    if feature_dim is not None:
        if x.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dims, got shape {tuple(x.shape)}")
        if not -x.ndim <= feature_dim < x.ndim:
            raise ValueError(
                f"feature_dim={feature_dim} is out of range for {name} {tuple(x.shape)}"
            )
        x = x.movedim(feature_dim, -1)
    elif x.ndim >= 4:
        x = x.movedim(1, -1)  # [N, C, H, W] -> [N, H, W, C]; a view, free for channels-last
    elif x.ndim < 2:
        raise ValueError(
            f"{name} must be [N, d], [N, T, d] or [N, C, H, W], got shape {tuple(x.shape)}"
        )
    return x.reshape(-1, x.shape[-1])


def _overflow_message(
    name: str,
    shape: tuple,
    x: torch.Tensor | None,
    dtype: torch.dtype,
    backend: str | None,
    what: str = "its sums of squared deviations overflow",
) -> str:
    size = "" if x is None else f" (features up to {float(x.abs().max()):.3g} in magnitude)"
    kernel = " with backend='torch' (the kernel sums each batch in float32)"
    if dtype == torch.float32:
        fix = "use CorrelationAccumulator(..., dtype=torch.float64)"
        fix += (kernel if backend == "triton" else "") + ", or scale the features down"
    else:
        fix = "scale the features down" + (" or run" + kernel if backend == "triton" else "")
    return f"{name} {shape}: {what} {dtype}{size}; {fix}"


def _check_finite(s: torch.Tensor, x: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    if not bool(torch.isfinite(s).all()):
        bad = int((~torch.isfinite(x)).sum())
        what = f"{bad} NaN/inf value(s)" if bad else "values whose sum overflows"
        raise ValueError(
            f"{name} {shape} contains {what}; the accumulator was not updated "
            "(pass check_finite=False to let them propagate)"
        )


class CorrelationAccumulator:
    """Streaming means, stds, (cross-)covariance and Pearson correlation of features.

    Args:
        d_a: number of features of ``x_a``.
        d_b: number of features of ``x_b``; ``None`` for self-statistics of one input
            (``update(x)``; :meth:`correlation` is then ``[d_a, d_a]``).
        dtype: dtype of the running statistics, ``torch.float32`` (default) or ``torch.float64``.
        device: where the statistics live; ``None`` takes the device of the first batch.
            Batches on another device raise ``ValueError``.
        backend: ``None``/``"auto"``, ``"torch"`` or ``"triton"`` (see ``pymerge.backends()``).
        joint: also keep the joint statistics of the concatenated ``d_a + d_b`` features
            (ZipIt!): :meth:`joint_correlation`. Costs ``(d_a + d_b)^2`` instead of
            ``d_a d_b`` per sample.
        check_finite: raise ``ValueError`` on NaN/inf input (see module doc).
        allow_tf32: let float32 inputs use TF32 tensor cores in the Triton kernel (faster,
            about 1e-3 relative error); off by default.

    Example:
        >>> acc = CorrelationAccumulator(512, 512)
        >>> for xa, xb in feature_pairs:  # [n_i, 512] each
        ...     acc.update(xa, xb)
        >>> corr = acc.correlation()  # [512, 512] float32
    """

    def __init__(
        self,
        d_a: int,
        d_b: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str | None = None,
        joint: bool = False,
        check_finite: bool = True,
        allow_tf32: bool = False,
    ) -> None:
        for nm, v in (("d_a", d_a), ("d_b", d_b)):
            if v is None and nm == "d_b":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{nm} must be a positive int, got {v!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if joint and d_b is None:
            raise ValueError("joint=True needs d_b (the joint statistics of two inputs)")
        self.d_a = int(d_a)
        self.d_b = None if d_b is None else int(d_b)
        self.dtype = dtype
        self.backend = backend
        self.joint = bool(joint)
        self.check_finite = bool(check_finite)
        self.allow_tf32 = bool(allow_tf32)
        # resolve "cuda" to "cuda:<current>" so it compares equal to tensors' devices
        self.device = None if device is None else torch.empty(0, device=device).device
        # self mode: one feature set of size _d (x_a, or [x_a, x_b] when joint)
        self._self = self.d_b is None or self.joint
        self._d = self.d_a + (self.d_b or 0) if self.joint else self.d_a
        self._n = 0
        self._eps = torch.finfo(dtype).eps  # largest epsilon any update computed in
        self._mean_a: torch.Tensor | None = None
        self._mean_b: torch.Tensor | None = None
        self._m2_a: torch.Tensor | None = None  # [d] sum of squared deviations
        self._m2_b: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None  # co-moment; self mode: upper triangle valid
        self.last_backend: str | None = None
        self._broken: str | None = None  # why every call refuses (an overflow after a write)
        self._ws: dict[str, torch.Tensor] = {}  # torch-path buffers reused between updates
        if self.device is not None:
            self._allocate(self.device)

    # ------------------------------------------------------------------ state
    def _allocate(self, device: torch.device) -> None:
        z = dict(device=device, dtype=self.dtype)
        if self._self:
            self._mean_a = torch.zeros(self._d, **z)
            self._m2_a = torch.zeros(self._d, **z)
            self._m2 = torch.zeros(self._d, self._d, **z)
        else:
            self._mean_a = torch.zeros(self.d_a, **z)
            self._mean_b = torch.zeros(self.d_b, **z)
            self._m2_a = torch.zeros(self.d_a, **z)
            self._m2_b = torch.zeros(self.d_b, **z)
            self._m2 = torch.zeros(self.d_a, self.d_b, **z)
        self.device = device

    def reset(self) -> None:
        """Forget every sample and free the work buffers (keeps configuration and device)."""
        self._n = 0
        self._eps = torch.finfo(self.dtype).eps
        self._broken = None
        self._ws.clear()
        if self._m2 is not None:
            self._allocate(self.device)

    @property
    def count(self) -> int:
        """Number of samples seen (rows after flattening)."""
        return self._n

    # ------------------------------------------------------------------ update
    def _prepare(
        self, x_a: Any, x_b: Any, feature_dim: int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        xa = _as_samples(x_a, "x_a", feature_dim)
        if self.d_b is None:
            if x_b is not None:
                raise ValueError(
                    "this accumulator has d_b=None (self-statistics): call update(x) with one input"
                )
            xb = None
        else:
            if x_b is None:
                raise ValueError(f"update needs x_b with {self.d_b} features (d_b={self.d_b})")
            xb = _as_samples(x_b, "x_b", feature_dim)
        if xa.shape[1] != self.d_a:
            raise ValueError(
                f"x_a {tuple(x_a.shape)} has {xa.shape[1]} features, accumulator expects "
                f"d_a={self.d_a}"
            )
        if xb is not None:
            if xb.shape[1] != self.d_b:
                raise ValueError(
                    f"x_b {tuple(x_b.shape)} has {xb.shape[1]} features, accumulator expects "
                    f"d_b={self.d_b}"
                )
            if xb.shape[0] != xa.shape[0]:
                raise ValueError(
                    f"x_a {tuple(x_a.shape)} gives {xa.shape[0]} samples but x_b "
                    f"{tuple(x_b.shape)} gives {xb.shape[0]}; they must come from the same inputs"
                )
            if xb.device != xa.device:
                raise ValueError(f"x_a is on {xa.device} but x_b is on {xb.device}")
            if xb.dtype != xa.dtype:
                common = torch.promote_types(xa.dtype, xb.dtype)
                xa, xb = xa.to(common), xb.to(common)
        if self.device is not None and xa.device != self.device:
            raise ValueError(
                f"inputs are on {xa.device} but the accumulator lives on {self.device}"
            )
        # a lazily negated view (torch._neg_view) keeps -x in memory: kernels read memory
        return xa.resolve_neg(), None if xb is None else xb.resolve_neg()

    def update(self, x_a: Any, x_b: Any = None, *, feature_dim: int | None = None) -> None:
        """Add one batch.

        Args:
            x_a: ``[n, d_a]``, ``[n, T, d_a]`` or ``[n, d_a, H, W]`` (fp16/bf16/fp32/fp64).
            x_b: same samples for model B (``d_b`` features); omit when ``d_b`` is None.
                Mixed dtypes are promoted to the common one.
            feature_dim: which dim holds the features (default: last for ``ndim <= 3``,
                1 for ``ndim >= 4``); the others are flattened into samples.
        """
        if self._broken is not None:
            raise ValueError(self._broken)
        xa, xb = self._prepare(x_a, x_b, feature_dim)
        n_b = xa.shape[0]
        if n_b == 0:
            return
        if self.joint:
            xa, xb = torch.cat([xa, xb], dim=1), None
        tensors = (xa,) if xb is None else (xa, xb)
        backend = choose_kernels(self.backend, *tensors)
        if backend == "triton" and xa.dtype not in _KERNEL_DTYPES:
            backend = "torch"  # the kernel handles fp16/bf16/fp32; float64 uses torch
        if self._m2 is None:
            self._allocate(xa.device)
        if backend == "triton":
            self._update_triton(xa, xb, x_a, x_b)
        else:
            self._update_torch(xa, xb, x_a, x_b)
        self.last_backend = backend

    def _first_shift(self, x: torch.Tensor, n_b: int) -> torch.Tensor:
        return (x.sum(0, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype) / n_b).to(
            self.dtype
        )

    def _workspace(self, key: str, n: int, d: int, like: torch.Tensor) -> torch.Tensor:
        """Reusable contiguous ``[n, d]`` buffer of the compute dtype.

        Fresh multi-MB CPU allocations page-fault on first touch, which costs as much as
        the arithmetic; the torch path therefore keeps its buffers between updates.
        """
        buf = self._ws.get(key)
        if (
            buf is None
            or buf.numel() < n * d
            or buf.device != like.device
            or buf.dtype != self.dtype
        ):
            buf = torch.empty(n * d, dtype=self.dtype, device=like.device)
            self._ws[key] = buf
        return buf[: n * d].view(n, d)

    @staticmethod
    def _centred_sums(c: torch.Tensor, n_b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum(c), sum(c^2))`` over rows of a contiguous ``[n, d]`` buffer in one call.

        ``batch_norm_update_stats`` gives the per-column mean and (two-pass) biased variance
        with one vectorised kernel; ``sum(c^2) = n var + sum(c)^2 / n``.
        """
        stats = getattr(torch, "batch_norm_update_stats", None)
        if stats is None:  # not a documented op: plain passes if a torch build lacks it
            s = c.sum(0)
            return s, (c * c).sum(0)
        mean, var = stats(c, None, None, 0.0)
        s = mean * n_b
        return s, var * n_b + s * mean

    def _update_torch(self, xa, xb, x_a, x_b) -> None:
        # GEMM-dominated. The memory-bound work around the GEMM: one centring pass per
        # operand into a reused contiguous buffer, one fused column-statistics kernel per
        # buffer (column sums and sums of squares), one addmm into the state.
        n_b = xa.shape[0]
        ka = self._mean_a if self._n else self._first_shift(xa, n_b)
        ca = torch.sub(xa, ka, out=self._workspace("a", n_b, xa.shape[1], xa))
        sa, qa = self._centred_sums(ca, n_b)
        if self.check_finite:
            _check_finite(sa, xa, "x_a/x_b" if self.joint else "x_a", tuple(x_a.shape))
        if xb is None:
            kb, cb, sb, qb = ka, ca, sa, qa
        else:
            kb = self._mean_b if self._n else self._first_shift(xb, n_b)
            cb = torch.sub(xb, kb, out=self._workspace("b", n_b, xb.shape[1], xb))
            sb, qb = self._centred_sums(cb, n_b)
            if self.check_finite:
                _check_finite(sb, xb, "x_b", tuple(x_b.shape))
        feats = self._feature_moments(n_b, ka, kb, sa, qa, sb, qb)
        if self.check_finite:
            bad = self._overflowing(qa, qb, feats)
            if bad is not None:
                raise ValueError(self._overflow(bad, xa, xb, x_a, x_b, "torch") + _UNCHANGED)
        self._m2.addmm_(ca.T, cb)
        self._merge(n_b, kb, sa, sb, feats, shift_b_in_cross=False)
        self._eps = max(self._eps, torch.finfo(self.dtype).eps)

    def _update_triton(self, xa, xb, x_a, x_b) -> None:
        from pymerge.kernels.correlation import correlation_update

        n_b = xa.shape[0]
        checked = {}
        if self.check_finite or self._n == 0:
            for key, x, orig in (("x_a", xa, x_a), ("x_b", xb, x_b)):
                if x is None:
                    continue
                s = x.sum(0, dtype=torch.float32)
                if self.check_finite:
                    label = "x_a/x_b" if self.joint else key
                    _check_finite(s, x, label, tuple(orig.shape))
                checked[key] = s
        if self._n:
            ka = self._mean_a
            kb = ka if xb is None else self._mean_b
        else:
            ka = (checked["x_a"] / n_b).to(self.dtype)
            kb = ka if xb is None else (checked["x_b"] / n_b).to(self.dtype)
        # Shifts rounded to the input dtype: for |x - k| << |k| the centred value x - k of
        # two fp16/bf16 numbers is then exact in that dtype (Sterbenz), so rounding the
        # centred operand for the tensor cores loses nothing where cancellation matters.
        # Chan's merge below accepts any shift.
        ka32 = ka.to(xa.dtype).to(torch.float32)
        kb32 = ka32 if xb is None else kb.to(xb.dtype).to(torch.float32)
        symmetric = xb is None
        accumulate = self.dtype == torch.float32
        cross, sa, qa, sb, qb = correlation_update(
            xa,
            xa if symmetric else xb,
            ka32,
            kb32,
            out=self._m2 if accumulate else None,
            symmetric=symmetric,
            allow_tf32=self.allow_tf32,
        )
        center_b = xa.dtype == torch.float32  # the kernel's default
        dt = self.dtype
        ka, kb, sa, qa, sb, qb = (t.to(dt) for t in (ka32, kb32, sa, qa, sb, qb))
        feats = self._feature_moments(n_b, ka, kb, sa, qa, sb, qb)
        if self.check_finite:
            bad = self._overflowing(qa, qb, feats)
            if bad is not None:
                msg = self._overflow(bad, xa, xb, x_a, x_b, "triton")
                if accumulate:  # the kernel has added this batch's cross products
                    self._broken = msg + _BROKEN
                    raise ValueError(self._broken)
                raise ValueError(msg + _UNCHANGED)
        if not accumulate:
            if symmetric:
                cross = torch.triu(cross)  # the rest of the fresh buffer is unset
            self._m2.add_(cross.to(self.dtype))
        self._merge(n_b, kb, sa, sb, feats, shift_b_in_cross=not center_b)
        self._eps = max(self._eps, torch.finfo(torch.float32).eps)

    def _feature_moments(self, n_b, ka, kb, sa, qa, sb, qb) -> tuple:
        """The per-feature part of Chan's merge, computed without touching the state:
        ``(delta_a, mean_a, m2_a, delta_b, mean_b, m2_b)`` after this batch (``delta`` =
        batch mean - running mean; the ``b`` entries are ``None`` in self mode)."""
        n_a = self._n

        def side(k, s, q, mean, m2):  # the batch's mean and M2 about it, merged
            new_mean, new_m2, delta = chan_merge(n_a, mean, m2, n_b, k + s / n_b, q - s * s / n_b)
            return delta, new_mean, new_m2

        a = side(ka, sa, qa, self._mean_a, self._m2_a)
        b = (None,) * 3 if self._self else side(kb, sb, qb, self._mean_b, self._m2_b)
        return (*a, *b)

    def _overflowing(self, qa, qb, feats) -> str | None:
        """``"a"``/``"b"`` when that side's sums of squares or merged moments are not finite
        (one device sync for all of them), else ``None``."""
        ok = torch.isfinite(qa).all() & torch.isfinite(feats[2]).all()
        if not self._self:
            ok = ok & torch.isfinite(qb).all() & torch.isfinite(feats[5]).all()
        if bool(ok):
            return None
        a_ok = bool(torch.isfinite(qa).all() & torch.isfinite(feats[2]).all())
        return "b" if a_ok else "a"

    def _overflow(self, side, xa, xb, x_a, x_b, backend) -> str:
        if side == "a" or xb is None:
            name = "x_a/x_b" if self.joint else "x_a"
            return _overflow_message(name, tuple(x_a.shape), xa, self.dtype, backend)
        return _overflow_message("x_b", tuple(x_b.shape), xb, self.dtype, backend)

    def _merge(self, n_b, kb, sa, sb, feats, *, shift_b_in_cross: bool) -> None:
        """Chan's merge; ``_m2`` already holds ``M2_A + (x_a - ka)^T (x_b - c_b)``."""
        delta_a, mean_a, m2_a, delta_b, mean_b, m2_b = feats
        n_a = self._n
        n = n_a + n_b
        # batch co-moment about the batch means: P - s_a s_b^T / n_B (- s_a k_b^T when the
        # kernel left b uncentred); then Chan's correction n_A n_B / n * delta_a delta_b^T
        right = sb / n_b
        if shift_b_in_cross:
            right = right + kb
        if n_a:
            c = n_a * n_b / n
            u = torch.stack([sa, delta_a], dim=1)
            v = torch.stack([-right, c * (delta_a if self._self else delta_b)], dim=0)
            self._m2.addmm_(u, v)
        else:
            self._m2.addr_(sa, right, alpha=-1.0)
        self._mean_a.copy_(mean_a)
        self._m2_a.copy_(m2_a)
        if not self._self:
            self._mean_b.copy_(mean_b)
            self._m2_b.copy_(m2_b)
        self._n = n

    def merge(self, other: CorrelationAccumulator) -> CorrelationAccumulator:
        """Add the statistics of ``other`` (same sizes/mode) into this one, in place (Chan)."""
        if not isinstance(other, CorrelationAccumulator):
            raise TypeError(f"can only merge a CorrelationAccumulator, got {type(other).__name__}")
        if (other.d_a, other.d_b, other.joint) != (self.d_a, self.d_b, self.joint):
            raise ValueError(
                f"cannot merge d_a={other.d_a}, d_b={other.d_b}, joint={other.joint} into "
                f"d_a={self.d_a}, d_b={self.d_b}, joint={self.joint}"
            )
        if other._n == 0:
            return self
        if self._m2 is None:
            self._allocate(other.device)
        dt, dev = self.dtype, self.device

        def get(t):
            return t.to(device=dev, dtype=dt)

        n_a, n_b = self._n, other._n
        n = n_a + n_b
        # per-feature moments: Chan's merge; the co-moment: M2_A + M2_B + c delta_a delta_b^T
        mean_a, m2_a, da = chan_merge(
            n_a, self._mean_a, self._m2_a, n_b, get(other._mean_a), get(other._m2_a)
        )
        self._m2.add_(get(other._sym_m2() if self._self else other._m2))
        if self._self:
            db = da
        else:
            mean_b, m2_b, db = chan_merge(
                n_a, self._mean_b, self._m2_b, n_b, get(other._mean_b), get(other._m2_b)
            )
            self._mean_b.copy_(mean_b)
            self._m2_b.copy_(m2_b)
        self._m2.addr_(da, db, alpha=n_a * n_b / n)
        self._mean_a.copy_(mean_a)
        self._m2_a.copy_(m2_a)
        self._n = n
        self._eps = max(self._eps, other._eps)
        return self

    # ------------------------------------------------------------------ results
    def _need(self, at_least: int = 1) -> None:
        if self._broken is not None:
            raise ValueError(self._broken)
        if self._n < at_least:
            raise ValueError(
                f"need at least {at_least} sample(s), the accumulator has seen {self._n}"
            )

    def _sym_m2(self) -> torch.Tensor:
        upper = torch.triu(self._m2)
        return upper + torch.triu(self._m2, 1).T

    def _check_joint(self, joint: bool) -> None:
        if joint and not self._self:
            raise ValueError("joint statistics need CorrelationAccumulator(..., joint=True)")

    def _full_m2(self, joint: bool) -> torch.Tensor:
        self._check_joint(joint)
        if not self._self:
            m2 = self._m2.clone()
        else:
            m2 = self._sym_m2()
            if self.joint and not joint:
                m2 = m2[: self.d_a, self.d_a :].clone()
        if self.check_finite and not bool(torch.isfinite(m2).all()):
            # finite inputs (checked at update): the cross moments overflowed
            raise ValueError(
                _overflow_message(
                    "the co-moment",
                    tuple(m2.shape),
                    None,
                    self.dtype,
                    self.last_backend,
                    "its sums of products overflow",
                )
            )
        return m2

    def _vars_means(self, joint: bool):
        """(m2_rows, m2_cols, mean_rows, mean_cols) matching the returned matrix."""
        if self._self:
            if self.joint and not joint:
                a, b = slice(0, self.d_a), slice(self.d_a, None)
                return self._m2_a[a], self._m2_a[b], self._mean_a[a], self._mean_a[b]
            return self._m2_a, self._m2_a, self._mean_a, self._mean_a
        return self._m2_a, self._m2_b, self._mean_a, self._mean_b

    @property
    def mean_a(self) -> torch.Tensor:
        """``[d_a]`` mean of model A's features (accumulator dtype)."""
        self._need()
        return self._mean_a[: self.d_a].clone()

    @property
    def mean_b(self) -> torch.Tensor:
        """``[d_b]`` mean of model B's features (``mean_a`` when ``d_b`` is None)."""
        self._need()
        if self.d_b is None:
            return self._mean_a.clone()
        if self.joint:
            return self._mean_a[self.d_a :].clone()
        return self._mean_b.clone()

    def _m2_of(self, side: str) -> torch.Tensor:
        if side == "a" or self.d_b is None:
            return self._m2_a[: self.d_a]
        return self._m2_a[self.d_a :] if self.joint else self._m2_b

    def _var(self, side: str, ddof: int) -> torch.Tensor:
        self._need(ddof + 1)
        return self._m2_of(side).clamp_min(0) / (self._n - ddof)

    def var_a(self, ddof: int = 1) -> torch.Tensor:
        """``[d_a]`` variance of model A's features (``ddof=1``: unbiased)."""
        return self._var("a", ddof)

    def var_b(self, ddof: int = 1) -> torch.Tensor:
        """``[d_b]`` variance of model B's features."""
        return self._var("b", ddof)

    def std_a(self, ddof: int = 1) -> torch.Tensor:
        """``[d_a]`` standard deviation of model A's features."""
        return self._var("a", ddof).sqrt()

    def std_b(self, ddof: int = 1) -> torch.Tensor:
        """``[d_b]`` standard deviation of model B's features."""
        return self._var("b", ddof).sqrt()

    def covariance(self, ddof: int = 1, *, joint: bool = False) -> torch.Tensor:
        """Covariance ``[d_a, d_b]`` (``[d_a, d_a]`` when ``d_b`` is None).

        ``joint=True`` (needs ``joint=True`` at construction): ``[d_a + d_b]^2`` over the
        concatenated features ``[x_a, x_b]``.
        """
        self._check_joint(joint)
        self._need(ddof + 1)
        return self._full_m2(joint) / (self._n - ddof)

    def correlation(self, *, joint: bool = False) -> torch.Tensor:
        """Pearson correlation ``[d_a, d_b]`` in ``[-1, 1]``; 0 for zero-variance features.

        ``joint=True``: the ``[d_a + d_b]^2`` correlation of ``[x_a, x_b]`` (ZipIt!).
        """
        self._check_joint(joint)
        self._need()
        m2 = self._full_m2(joint)
        m2_r, m2_c, mean_r, mean_c = self._vars_means(joint)
        sd_r = self._live_sd(m2_r, mean_r)
        sd_c = self._live_sd(m2_c, mean_c)
        inv_r = torch.where(sd_r > 0, 1.0 / sd_r, torch.zeros_like(sd_r))
        inv_c = torch.where(sd_c > 0, 1.0 / sd_c, torch.zeros_like(sd_c))
        corr = (m2 * (inv_r[:, None] * inv_c[None, :])).clamp_(-1.0, 1.0)  # exactly symmetric
        if self._self and (joint or not self.joint):
            corr.diagonal().copy_((sd_r > 0).to(corr.dtype))
        return corr

    def joint_correlation(self) -> torch.Tensor:
        """``[d_a + d_b, d_a + d_b]`` correlation of ``[x_a, x_b]`` (needs ``joint=True``)."""
        return self.correlation(joint=True)

    def joint_covariance(self, ddof: int = 1) -> torch.Tensor:
        """``[d_a + d_b, d_a + d_b]`` covariance of ``[x_a, x_b]`` (needs ``joint=True``)."""
        return self.covariance(ddof, joint=True)

    def gram(self, *, joint: bool = False) -> torch.Tensor:
        """Uncentred second moment ``X_a^T X_b / N`` (RegMean's ``X^T X / N`` when d_b is None)."""
        self._check_joint(joint)
        self._need()
        m2 = self._full_m2(joint)
        _, _, mean_r, mean_c = self._vars_means(joint)
        return (m2 / self._n).addr_(mean_r, mean_c)

    def _live_sd(self, m2: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """sqrt(M2), with features constant up to rounding set to exactly 0."""
        m2 = m2.clamp_min(0)
        tol = _ZERO_VAR_ULPS * self._eps * mean.abs()
        dead = m2 <= self._n * tol * tol
        return torch.where(dead, torch.zeros_like(m2), m2.sqrt())

    def __repr__(self) -> str:
        mode = "self" if self.d_b is None else ("joint" if self.joint else "cross")
        return (
            f"CorrelationAccumulator(d_a={self.d_a}, d_b={self.d_b}, mode={mode}, "
            f"count={self._n}, dtype={self.dtype}, device={self.device})"
        )


def correlation(
    x_a: Any,
    x_b: Any = None,
    *,
    backend: str | None = None,
    dtype: torch.dtype = torch.float32,
    check_finite: bool = True,
    allow_tf32: bool = False,
    feature_dim: int | None = None,
) -> torch.Tensor:
    """One-shot Pearson correlation between the features of ``x_a`` and ``x_b``.

    Args:
        x_a: ``[N, d_a]`` (or ``[N, T, d_a]``, ``[N, d_a, H, W]``), fp16/bf16/fp32/fp64.
        x_b: ``[N, d_b]`` for the same samples; ``None`` correlates ``x_a`` with itself.
        backend, dtype, check_finite, allow_tf32: as for :class:`CorrelationAccumulator`.

    Returns:
        ``[d_a, d_b]`` (``[d_a, d_a]``) tensor of ``dtype`` on the inputs' device;
        zero-variance features give 0.
    """
    xa = _as_samples(x_a, "x_a", feature_dim)
    d_b = None if x_b is None else _as_samples(x_b, "x_b", feature_dim).shape[1]
    acc = CorrelationAccumulator(
        xa.shape[1],
        d_b,
        dtype=dtype,
        backend=backend,
        check_finite=check_finite,
        allow_tf32=allow_tf32,
    )
    acc.update(x_a, x_b, feature_dim=feature_dim)
    return acc.correlation()
