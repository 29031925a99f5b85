"""Size of the manifold of linearly connected minima around a trained model, and a ranking of
candidate model expansions by it (after Malviya, Huang, Fournier, Chandar 2024).

**This is an estimator of the paper's quantity, not the paper's exact metric** (its method
could not be checked against the full text). It follows the construction the paper builds
on, the loss-surface simplexes of Benton et al. (2021): from the trained θ₀, grow a
k-simplex of low-loss parameters and measure its volume.

* Vertices θ₁..θ_k start at θ₀ plus small noise (``init_scale`` × the RMS of each tensor)
  and are trained (SGD with momentum) on
  ``E_{α∼Dir(1)} L(Σ_i α_i θ_i) − volume_weight · log V(θ₀, θ₁, .., θ_k)``, θ₀ fixed,
  ``samples`` Dirichlet draws per step.
* V is the k-dimensional volume of the simplex from the **Cayley–Menger determinant** of the
  pairwise squared distances d²_ij = ‖θ_i − θ_j‖² (all trained parameters, flattened):
  V² = (−1)^{k+1} det(CM) / (2^k (k!)²), CM the (k+2)×(k+2) bordered distance matrix.
* Every ``eval_every`` steps the simplex loss is measured on ``eval_batches`` at fixed
  points: the vertices, the centroid and ``eval_points`` Dirichlet draws (seeded), and its
  **maximum** over them is compared with the threshold (default: L(θ₀) + ``tolerance``).
* The reported size is the largest log V reached while that maximum stayed under the
  threshold (``-inf`` when even the first measured simplex exceeds it).

Parameters are trained; buffers (e.g. BatchNorm statistics) stay θ₀'s and the model runs in
eval mode, so for BatchNorm networks moving weights without recalibrating statistics makes
the estimate conservative. log V grows with the number of parameters for the same
per-parameter spread (edges are norms over all of them): compare expansions with that in
mind. :func:`rank_expansions` ranks candidates by it; :func:`expand_mlp` builds the usual
function-preserving expansions of :class:`pymerge.testing.models.MLP` (Net2Net widening,
zero-initialised new units, identity layers).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pymerge._util.args import check_seed
from pymerge._util.progress import progress_bar

__all__ = [
    "ManifoldSize",
    "ExpansionRank",
    "cayley_menger_log_volume",
    "minima_manifold_size",
    "rank_expansions",
    "expand_mlp",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def cayley_menger_log_volume(points: Sequence[Mapping[str, Tensor]] | Tensor) -> Tensor:
    """log of the k-volume of the simplex spanned by k+1 points (state dicts of the same
    keys, or rows of a [k+1, D] tensor), from the Cayley–Menger determinant in float64;
    differentiable. ``-inf`` for a degenerate simplex (a zero or negative determinant)."""
    if isinstance(points, Tensor):
        flat = points.to(torch.float64)
        if flat.dim() != 2:
            raise ValueError(f"points must be [k+1, D], got shape {tuple(points.shape)}")
        gram = flat @ flat.T
        sq = gram.diagonal()
        d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)
    else:
        pts = list(points)
        n = len(pts)
        rows = []
        for i in range(n):
            row = []
            for j in range(n):
                if i == j:
                    row.append(torch.zeros((), dtype=torch.float64))
                else:
                    row.append(sum(((pts[i][k] - pts[j][k]).double() ** 2).sum() for k in pts[0]))
            rows.append(torch.stack(row))
        d2 = torch.stack(rows)
    m = d2.shape[0]
    k = m - 1
    if k < 1:
        raise ValueError("a simplex needs at least two points")
    cm = torch.ones((m + 1, m + 1), dtype=torch.float64, device=d2.device)
    cm[0, 0] = 0.0
    cm = cm.clone()
    cm[1:, 1:] = d2
    sign, logabs = torch.linalg.slogdet(cm)
    # V^2 = (-1)^(k+1) det(CM) / (2^k (k!)^2): a real simplex has (-1)^(k+1) det(CM) > 0
    expected = -1.0 if (k + 1) % 2 else 1.0
    if float(sign.detach()) != expected:
        return torch.tensor(float("-inf"), dtype=torch.float64)
    return 0.5 * (logabs - k * math.log(2.0) - 2.0 * math.lgamma(k + 1))


@dataclass
class ManifoldSize:
    """Result of :func:`minima_manifold_size`.

    ``log_volume``: the largest log V of a simplex whose measured maximum loss stayed under
    ``threshold`` (``-inf`` if none did); ``base_loss``: L(θ₀) on the evaluation data;
    ``history``: one dict per measurement (``step``, ``log_volume``, ``max_loss``,
    ``mean_loss``); ``final_*``: the last measurement."""

    log_volume: float
    threshold: float
    base_loss: float
    vertices: int
    num_params: int
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def final_log_volume(self) -> float:
        return self.history[-1]["log_volume"] if self.history else math.nan

    @property
    def final_max_loss(self) -> float:
        return self.history[-1]["max_loss"] if self.history else math.nan


def _pairs(batches: Any, what: str) -> list[tuple[Any, Tensor]]:
    from pymerge.landscape.evaluate import _as_batches

    try:
        return _as_batches(batches)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{what}: {e}") from None


def _loss_value(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(f"loss_fn must return the batch's mean loss as a 0-d tensor, got {shape}")
    return loss.reshape(())


def minima_manifold_size(
    model: nn.Module,
    state: Mapping[str, Tensor],
    batches: Any,
    loss_fn: LossFn | None = None,
    *,
    vertices: int = 2,
    steps: int = 100,
    lr: float = 0.05,
    momentum: float = 0.9,
    volume_weight: float = 1e-2,
    init_scale: float = 1e-2,
    samples: int = 1,
    eval_batches: Any = None,
    eval_every: int = 10,
    eval_points: int = 8,
    threshold: float | None = None,
    tolerance: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> ManifoldSize:
    """Estimate the size of the low-loss, linearly connected region around θ₀ = ``state``
    (see the module docstring: a trained simplex and its Cayley–Menger log-volume).

    Args:
        model: the architecture (a deep copy is used; ``model`` and ``state`` are never
            modified).
        state: the trained θ₀.
        batches: training batches ``(inputs, targets)`` (cycled for ``steps`` steps).
        loss_fn: mean loss of a batch (default cross-entropy).
        vertices: k, the number of trained vertices (a k-simplex with θ₀).
        steps, lr, momentum: SGD steps, learning rate and momentum on the vertices (plain
            SGD, not Adam: Adam's per-parameter normalisation would move every coordinate
            at ~lr per step whatever the balance of the two terms, so the simplex would
            grow with the step count instead of stopping where the loss pushes back).
        volume_weight: λ_v of the −λ_v log V term.
        init_scale: initial offset of each vertex, relative to each tensor's RMS.
        samples: Dirichlet draws per step.
        eval_batches: where the simplex loss is measured (default ``batches``).
        eval_every, eval_points: measurement period and number of random simplex points.
        threshold: loss bound of the simplex (default L(θ₀) + ``tolerance``).
        seed: seeds the vertex noise, the draws and the evaluation points.

    Returns:
        :class:`ManifoldSize`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_seed(seed)
    for name, v, lo in (
        ("vertices", vertices, 1),
        ("steps", steps, 0),
        ("samples", samples, 1),
        ("eval_every", eval_every, 1),
        ("eval_points", eval_points, 0),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    for name, v in (
        ("lr", lr),
        ("momentum", momentum),
        ("volume_weight", volume_weight),
        ("init_scale", init_scale),
    ):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if init_scale == 0:
        raise ValueError("init_scale must be > 0: a zero-volume simplex has no gradient of log V")
    loss_fn = F.cross_entropy if loss_fn is None else loss_fn
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    train = _pairs(batches, "batches")
    evals = train if eval_batches is None else _pairs(eval_batches, "eval_batches")
    work = copy.deepcopy(model)
    work.load_state_dict(state)
    work.eval()
    names = [n for n, p in work.named_parameters() if p.is_floating_point()]
    if not names:
        raise ValueError("the model has no floating parameters to move")
    fixed = {k: v.detach() for k, v in work.state_dict().items() if k not in names}
    theta0 = {n: state[n].detach().to(torch.float32) for n in names}
    gen = torch.Generator().manual_seed(seed)
    verts = []
    for _ in range(vertices):
        v = {}
        for n in names:
            t = theta0[n]
            rms = float(t.pow(2).mean().sqrt()) if t.numel() else 0.0
            noise = torch.randn(t.shape, generator=gen).to(t.device) * init_scale * (rms or 1.0)
            v[n] = (t + noise).requires_grad_(True)
        verts.append(v)
    opt = torch.optim.SGD([p for v in verts for p in v.values()], lr=lr, momentum=momentum)
    eval_alphas = _eval_alphas(vertices + 1, eval_points, seed)
    num_params = sum(t.numel() for t in theta0.values())

    def point(alpha: Tensor) -> dict[str, Tensor]:
        a = alpha.to(torch.float32)
        return {
            n: a[0] * theta0[n] + sum(a[i + 1] * verts[i][n] for i in range(vertices))
            for n in names
        }

    def batch_loss(params: Mapping[str, Tensor], x: Any, y: Tensor) -> Tensor:
        out = torch.func.functional_call(work, {**fixed, **params}, (x,))
        return _loss_value(loss_fn(out, y))

    def log_volume() -> Tensor:
        pts = [theta0] + verts
        return cayley_menger_log_volume(pts)

    @torch.no_grad()
    def measure(step: int) -> dict[str, float]:
        losses = []
        for alpha in eval_alphas:
            p = point(alpha)
            tot, n = 0.0, 0
            for x, y in evals:
                tot += float(batch_loss(p, x, y)) * int(y.shape[0])
                n += int(y.shape[0])
            losses.append(tot / n)
        arr = np.asarray(losses)
        return {
            "step": float(step),
            "log_volume": float(log_volume()),
            "max_loss": float(np.max(arr)) if np.all(np.isfinite(arr)) else math.inf,
            "mean_loss": float(np.mean(arr)),
        }

    with torch.no_grad():
        tot, n = 0.0, 0
        for x, y in evals:
            tot += float(batch_loss(theta0, x, y)) * int(y.shape[0])
            n += int(y.shape[0])
        base = tot / n
    if not math.isfinite(base):
        raise ValueError(f"the loss of θ₀ is {base}: no low-loss region to measure")
    bound = base + float(tolerance) if threshold is None else float(threshold)
    if not math.isfinite(bound):
        raise ValueError(f"threshold must be finite, got {bound}")
    history = [measure(0)]
    best = history[0]["log_volume"] if history[0]["max_loss"] <= bound else -math.inf
    draw = np.random.default_rng(seed + 1)  # the Dirichlet draws (no global RNG touched)
    with progress_bar(progress, total=steps, desc="simplex", unit="step") as bar:
        for step in range(1, steps + 1):
            x, y = train[(step - 1) % len(train)]
            obj = 0.0
            for _ in range(samples):
                alpha = torch.as_tensor(draw.dirichlet(np.ones(vertices + 1)))
                obj = obj + batch_loss(point(alpha), x, y) / samples
            lv = log_volume()
            total = obj - volume_weight * lv if torch.isfinite(lv) else obj
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            bar.update(1)
            if step % eval_every == 0 or step == steps:
                h = measure(step)
                history.append(h)
                if h["max_loss"] <= bound and h["log_volume"] > best:
                    best = h["log_volume"]
                bar.set_postfix(logV=f"{h['log_volume']:.2f}", loss=f"{h['max_loss']:.3f}")
    return ManifoldSize(
        log_volume=best,
        threshold=bound,
        base_loss=base,
        vertices=vertices,
        num_params=num_params,
        history=history,
    )


def _eval_alphas(m: int, extra: int, seed: int) -> list[Tensor]:
    """Vertices, the centroid and ``extra`` Dirichlet(1) draws (seeded)."""
    eye = torch.eye(m, dtype=torch.float64)
    pts = [eye[i] for i in range(m)] + [torch.full((m,), 1.0 / m, dtype=torch.float64)]
    if extra:
        g = np.random.default_rng(seed + 2)
        pts += [torch.as_tensor(a) for a in g.dirichlet(np.ones(m), size=extra)]
    return pts


@dataclass
class ExpansionRank:
    """One candidate of :func:`rank_expansions`: its name, rank (1 = largest manifold) and
    :class:`ManifoldSize`."""

    name: str
    rank: int
    size: ManifoldSize

    @property
    def log_volume(self) -> float:
        return self.size.log_volume


def rank_expansions(
    candidates: Mapping[str, tuple[nn.Module, Mapping[str, Tensor]]],
    batches: Any,
    loss_fn: LossFn | None = None,
    **options: Any,
) -> list[ExpansionRank]:
    """Rank candidate expansions of one network by :func:`minima_manifold_size` (largest
    first; ties keep the given order). ``candidates``: name -> (model, state) of each
    expanded network (e.g. from :func:`expand_mlp`); ``options`` go to
    :func:`minima_manifold_size` (the same for every candidate, same seed)."""
    if not isinstance(candidates, Mapping) or not candidates:
        raise ValueError("candidates must be a non-empty mapping name -> (model, state)")
    sizes = {}
    for name, pair in candidates.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"candidates[{name!r}] must be a (model, state) pair")
        sizes[name] = minima_manifold_size(pair[0], pair[1], batches, loss_fn, **options)
    order = sorted(sizes, key=lambda n: -sizes[n].log_volume)
    return [ExpansionRank(name=n, rank=i + 1, size=sizes[n]) for i, n in enumerate(order)]


# --------------------------------------------------------------------------- expansions

EXPANSIONS = ("net2net", "zero")


def expand_mlp(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    widths: Sequence[int] | None = None,
    depth: int | None = None,
    method: str = "net2net",
    noise: float = 0.0,
    init_scale: float = 1.0,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Tensor]]:
    """A function-preserving expansion of a trained :class:`pymerge.testing.models.MLP`.

    Args:
        model, state: the trained MLP (ReLU activations for ``depth``) and its weights.
        widths: new hidden widths (each >= the old one; default: unchanged).
        depth: new number of hidden layers (>= the old one): identity layers (weight I, bias
            0) are appended after the last hidden layer; ReLU(I·h) = h for h = ReLU(·) >= 0.
        method: how new units are made. ``"net2net"`` (Net2WiderNet, Chen et al. 2016): each
            new unit copies a random existing unit (incoming weights and bias) and the
            outgoing weights of every copy of a unit are divided by its number of copies;
            ``noise`` > 0 adds N(0, noise²·rms²) to the copies' incoming weights to break
            the symmetry (then only approximately function-preserving). ``"zero"``: new units
            get random incoming weights (Kaiming-uniform × ``init_scale``) and zero outgoing
            weights.
        seed: seeds the choices and the random weights.

    Returns:
        ``(new_model, new_state)``; the new model computes the same function as the old one
        (exactly for ``noise=0``, up to float rounding).
    """
    # duck-typed on pymerge.testing.models.MLP (layer 6, which this layer may not import):
    # an nn.Sequential with num_hidden, fc0..fc{L-1}, act{i}, out, built as
    # type(model)(in_dim, hidden, out_dim, act=..., bias=...)
    L = getattr(model, "num_hidden", None)
    if not (
        isinstance(model, nn.Sequential)
        and isinstance(L, int)
        and all(hasattr(model, f"fc{i}") for i in range(L))
        and hasattr(model, "out")
    ):
        raise TypeError(
            f"expand_mlp expands a pymerge.testing.models.MLP, got {type(model).__name__}"
        )
    if method not in EXPANSIONS:
        raise ValueError(f"method must be one of {EXPANSIONS}, got {method!r}")
    check_seed(seed)
    old = [int(state[f"fc{i}.weight"].shape[0]) for i in range(L)]
    new = list(old) if widths is None else [int(w) for w in widths]
    if len(new) != L:
        raise ValueError(f"widths has {len(new)} entries for {L} hidden layers")
    for i, (o, n) in enumerate(zip(old, new, strict=True)):
        if n < o:
            raise ValueError(f"widths[{i}] = {n} is smaller than the current width {o}")
    depth = L if depth is None else int(depth)
    if depth < L:
        raise ValueError(f"depth {depth} is smaller than the current {L} hidden layers")
    acts = {type(m) for n, m in model.named_children() if n.startswith("act")}
    if depth > L and acts != {nn.ReLU}:
        raise ValueError("identity layers preserve the function only after ReLU activations")
    if not model.bias:
        raise ValueError("expand_mlp needs an MLP with biases")
    gen = torch.Generator().manual_seed(seed)
    in_dim = int(state["fc0.weight"].shape[1])
    out_dim = int(state["out.weight"].shape[0])
    sd = {k: v.detach().clone().to(torch.float64) for k, v in state.items()}
    for i in range(L):
        if new[i] == old[i]:
            continue
        w_in, b_in = sd[f"fc{i}.weight"], sd[f"fc{i}.bias"]
        nxt = f"fc{i + 1}" if i + 1 < L else "out"
        w_out = sd[f"{nxt}.weight"]
        extra = new[i] - old[i]
        if method == "net2net":
            src = torch.randint(0, old[i], (extra,), generator=gen)
            mapping = torch.cat([torch.arange(old[i]), src])
            counts = torch.bincount(mapping, minlength=old[i]).to(torch.float64)
            new_in = w_in[mapping].clone()
            if noise:
                rms = float(w_in.pow(2).mean().sqrt())
                new_in[old[i] :] += (
                    torch.randn(new_in[old[i] :].shape, generator=gen).double() * noise * rms
                )
            sd[f"fc{i}.weight"] = new_in
            sd[f"fc{i}.bias"] = b_in[mapping].clone()
            sd[f"{nxt}.weight"] = w_out[:, mapping] / counts[mapping][None, :]
        else:
            fan_in = w_in.shape[1]
            bound = init_scale / math.sqrt(fan_in)
            rand_w = (torch.rand((extra, fan_in), generator=gen).double() * 2 - 1) * bound
            rand_b = (torch.rand((extra,), generator=gen).double() * 2 - 1) * bound
            sd[f"fc{i}.weight"] = torch.cat([w_in, rand_w])
            sd[f"fc{i}.bias"] = torch.cat([b_in, rand_b])
            sd[f"{nxt}.weight"] = torch.cat(
                [w_out, torch.zeros(w_out.shape[0], extra, dtype=torch.float64)], 1
            )
    # identity layers appended after the last hidden one: fc{L}.. take the old "out"'s place
    widths_all = new + [new[-1]] * (depth - L)
    for j in range(L, depth):
        sd[f"fc{j}.weight"] = torch.eye(new[-1], dtype=torch.float64)
        sd[f"fc{j}.bias"] = torch.zeros(new[-1], dtype=torch.float64)
    act = next(n for n, m in model.named_children() if n.startswith("act"))
    act_name = {nn.ReLU: "relu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.SiLU: "silu"}[
        type(getattr(model, act))
    ]
    new_model = type(model)(in_dim, widths_all, out_dim, act=act_name, bias=True)
    dtype = state["fc0.weight"].dtype
    out_state = {k: v.to(dtype) for k, v in sd.items()}
    new_model.load_state_dict(out_state)
    return new_model, {k: v.detach().clone() for k, v in new_model.state_dict().items()}
