"""Federated learning with Weight Scope Alignment (WSA) on MNIST-1D, against FedAvg and FedProx.

One command::

    python examples/fl_wsa.py                 # the full run (about 5 minutes on 2 cores)
    python examples/fl_wsa.py --quick         # a smoke run (seconds)

**Federated part.** MNIST-1D (``mnist1d.data.make_dataset``, generated locally) is split
over K clients non-IID: for every class, the class's samples are divided among the clients
in proportions drawn from ``Dirichlet(alpha)`` (``alpha = 0.3``: most clients see a few
classes). Every round each client starts from the global model and trains locally (SGD,
momentum 0.9), then the server averages the clients weighted by their sample counts
(:func:`pymerge.interpolate`). Three client objectives:

* **FedAvg**: the cross-entropy.
* **FedProx**: plus ``mu/2 * ||w - w_global||^2`` (``mu = 0.01``).
* **FedAvg + WSA**: plus ``lam * sum_l KL(N(mu_l, sigma_l^2) || N(mu~_l, sigma~_l^2))``
  (:class:`pymerge.wsa.ScopeRegularizer`) toward a target fused each round: the
  size-weighted :func:`pymerge.wsa.fuse_scopes` of the previous round's client models
  (round 0: the scope of the initial global model); the server still averages (FedAvg).

Reported per round: the global model's test accuracy (and its layers' std), and the
clients' *scope spread*
(the mean over clients of ``sum_l KL(client scope || fused scope of the round's clients)``,
measured the same way for every method).

**Pair part.** Two models trained from different seeds (all data, IID), either plainly or
each with the WSA regulariser toward one target scope (the fused scope of the two initial
models), are interpolated with :func:`pymerge.interpolation_curve`; the loss and error
barriers (Git Re-Basin form) are reported, before and after weight matching.

Everything is averaged over seeds (default 3) and reported as mean +- std. The table goes to
stdout (Markdown) and the curves to a PNG (``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _mnist1d import Data, make_data  # noqa: E402

from pymerge import interpolate  # noqa: E402
from pymerge.align import weight_matching  # noqa: E402
from pymerge.landscape import error_barrier, interpolation_curve, loss_barrier  # noqa: E402
from pymerge.testing.models import MLP  # noqa: E402
from pymerge.wsa import ScopeRegularizer, fuse_scopes, scope_kl, weight_scope  # noqa: E402

METHODS = ("fedavg", "fedprox", "wsa")
LABELS = {"fedavg": "FedAvg", "fedprox": "FedProx", "wsa": "FedAvg + WSA"}


@dataclass
class Config:
    samples: int = 10_000  # MNIST-1D signals (80% train)
    clients: int = 10
    dirichlet: float = 0.3  # non-IID concentration
    rounds: int = 20
    local_epochs: int = 3
    batch_size: int = 32
    lr: float = 0.05
    width: int = 128
    depth: int = 2
    mu: float = 0.01  # FedProx
    lams: tuple[float, ...] = (1.0, 10.0)  # WSA regulariser weights (federated part)
    pair_epochs: int = 10
    pair_lam: float = 1.0  # WSA regulariser weight (pair part)
    points: int = 11  # interpolation points
    seeds: tuple[int, ...] = (0, 1, 2)
    min_client: int = 10  # resample the split until every client has this many samples
    target: str = "fused"  # WSA target: "fused" each round, or "fixed" at round 0
    methods: tuple[str, ...] = METHODS
    pair: bool = True


QUICK = Config(
    samples=1200,
    clients=3,
    rounds=2,
    local_epochs=1,
    width=32,
    lams=(1.0,),
    pair_epochs=1,
    points=3,
    seeds=(0,),
)


@dataclass
class FLRun:
    method: str
    seed: int
    lam: float = 0.0  # the WSA weight (method "wsa")
    accuracy: list[float] = field(default_factory=list)
    spread: list[float] = field(default_factory=list)  # mean client KL to the fused scope
    target_kl: list[float] = field(default_factory=list)  # mean client KL to the target
    global_std: list[dict[str, float]] = field(default_factory=list)  # layer -> std, per round


# --------------------------------------------------------------------------- data


def dirichlet_split(y: Tensor, k: int, alpha: float, seed: int, min_size: int) -> list[Tensor]:
    """Indices of each of ``k`` clients: every class divided by ``Dirichlet(alpha)``
    proportions; redrawn until each client has at least ``min_size`` samples."""
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(k)]
        for c in np.unique(labels):
            idx = rng.permutation(np.nonzero(labels == c)[0])
            cuts = (np.cumsum(rng.dirichlet([alpha] * k)) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]
    raise RuntimeError(f"no Dirichlet({alpha}) split gives every client {min_size} samples")


# --------------------------------------------------------------------------- training


def make_model(cfg: Config) -> nn.Module:
    return MLP(40, (cfg.width,) * cfg.depth, 10)


def _local(
    model: nn.Module,
    start: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    cfg: Config,
    *,
    epochs: int,
    gen: torch.Generator,
    prox: dict[str, Tensor] | None = None,
    reg: ScopeRegularizer | None = None,
) -> dict[str, Tensor]:
    """Train ``model`` from ``start`` on (x, y): SGD with momentum 0.9; the FedProx or WSA
    term when given. Returns a detached copy of the state dict."""
    model.load_state_dict(start)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if prox is not None:
                loss = loss + cfg.mu / 2 * sum(
                    (p - prox[k]).pow(2).sum() for k, p in model.named_parameters()
                )
            if reg is not None:
                loss = loss + reg(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def accuracy(model: nn.Module, state: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    model.load_state_dict(state)
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def _mean_kl(states: Sequence[dict[str, Tensor]], target: dict) -> float:
    """Mean over the states of ``sum_l KL(scope_l || target_l)``."""
    out = []
    for s in states:
        sc = weight_scope(s, layers=list(target))
        out.append(sum(scope_kl(sc[k], target[k]) for k in target))
    return float(np.mean(out))


def run_fl(method: str, data: Data, cfg: Config, seed: int, lam: float = 0.0) -> FLRun:
    """One federated run (``lam``: the WSA weight); the split, the initial model and the
    batch order follow ``seed``."""
    parts = dirichlet_split(data.y_train, cfg.clients, cfg.dirichlet, seed, cfg.min_client)
    sizes = [len(p) for p in parts]
    weights = [s / sum(sizes) for s in sizes]
    torch.manual_seed(seed)
    model = make_model(cfg)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = list(weight_scope(model))
    target = weight_scope(global_state, layers=layers)
    reg = ScopeRegularizer(target, lam) if method == "wsa" else None
    gen = torch.Generator().manual_seed(10_000 + seed)
    run = FLRun(method, seed, lam if method == "wsa" else 0.0)
    if cfg.target not in ("fused", "fixed"):
        raise ValueError(f"target must be 'fused' or 'fixed', got {cfg.target!r}")
    for _ in range(cfg.rounds):
        if reg is not None and cfg.target == "fused":
            reg.set_target(target)
        clients = []
        for p in parts:
            clients.append(
                _local(
                    model,
                    global_state,
                    data.x_train[p],
                    data.y_train[p],
                    cfg,
                    epochs=cfg.local_epochs,
                    gen=gen,
                    prox=global_state if method == "fedprox" else None,
                    reg=reg,
                )
            )
        run.target_kl.append(_mean_kl(clients, target))
        fused = fuse_scopes(clients, weights=weights, layers=layers)
        run.spread.append(_mean_kl(clients, fused))
        target = fused  # the next round's target
        global_state = interpolate(clients, weights)
        run.accuracy.append(accuracy(model, global_state, data.x_test, data.y_test))
        scope = weight_scope(global_state, layers=layers)
        run.global_std.append({k: scope[k].std for k in layers})
    return run


# --------------------------------------------------------------------------- pair part

PAIR_VARIANTS = {
    "plain": "plain",
    "wsa_init": "toward the fused scope of the two inits",
    "wsa_trained": "toward the fused scope of the two plain models",
}


def run_pair(data: Data, cfg: Config, seed: int) -> dict[str, float]:
    """Two models from seeds ``2 seed + 1``, ``2 seed + 2`` (same initialisations and batch
    orders in every variant): trained plainly, then with the WSA regulariser toward one
    target scope: the fused scope of the two initial models, or of the two plainly trained
    ones (a two-stage protocol). Barriers of each pair's linear path, before and after
    weight matching."""
    inits = []
    for s in (2 * seed + 1, 2 * seed + 2):
        torch.manual_seed(s)
        inits.append({k: v.detach().clone() for k, v in make_model(cfg).state_dict().items()})
    model = make_model(cfg)
    layers = list(weight_scope(model))
    spec = model.spec()
    x_eval, y_eval = data.x_test, data.y_test

    def eval_fn(m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            logits = m(x_eval)
            return {
                "loss": float(F.cross_entropy(logits, y_eval)),
                "accuracy": float((logits.argmax(1) == y_eval).float().mean()),
            }

    def train_pair(reg: ScopeRegularizer | None) -> list[dict[str, Tensor]]:
        out = []
        for i, init in enumerate(inits):
            gen = torch.Generator().manual_seed(20_000 + 2 * seed + i)
            out.append(
                _local(
                    model,
                    init,
                    data.x_train,
                    data.y_train,
                    cfg,
                    epochs=cfg.pair_epochs,
                    gen=gen,
                    reg=reg,
                )
            )
        return out

    pairs = {"plain": train_pair(None)}
    pairs["wsa_init"] = train_pair(
        ScopeRegularizer(fuse_scopes(inits, layers=layers), cfg.pair_lam)
    )
    trained_target = fuse_scopes(pairs["plain"], layers=layers)
    pairs["wsa_trained"] = train_pair(ScopeRegularizer(trained_target, cfg.pair_lam))
    out: dict[str, float] = {}
    for name, states in pairs.items():
        perm = weight_matching(spec, states[0], states[1]).perm
        for tag, kw in (("", {}), ("_wm", {"spec": spec, "perm": perm})):
            curve = interpolation_curve(model, states[0], states[1], eval_fn, cfg.points, **kw)
            out[f"{name}_loss_barrier{tag}"] = loss_barrier(curve)
            out[f"{name}_error_barrier{tag}"] = error_barrier(curve)
        out[f"{name}_acc"] = float(np.mean([accuracy(model, s, x_eval, y_eval) for s in states]))
        sa, sb = (weight_scope(s, layers=layers) for s in states)
        out[f"{name}_scope_kl"] = float(sum(scope_kl(sa[k], sb[k]) for k in layers))
    return out


# --------------------------------------------------------------------------- report


def _ms(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    v = np.asarray(values, dtype=float) * scale
    if len(v) < 2:
        return f"{v.mean():.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _variants(cfg: Config) -> list[tuple[str, float]]:
    """(method, lam) of every federated run per seed."""
    out = []
    for m in cfg.methods:
        out += [(m, lam) for lam in cfg.lams] if m == "wsa" else [(m, 0.0)]
    return out


def _label(method: str, lam: float) -> str:
    return f"{LABELS[method]} (λ = {lam:g})" if method == "wsa" else LABELS[method]


def summarise(runs: list[FLRun], pairs: list[dict[str, float]], cfg: Config) -> str:
    lines = [
        f"MNIST-1D, {cfg.samples} samples (80% train), {cfg.clients} clients, Dirichlet α = "
        f"{cfg.dirichlet}, {cfg.rounds} rounds x {cfg.local_epochs} local epoch(s), MLP "
        f"40-{cfg.width}x{cfg.depth}-10, SGD lr {cfg.lr} (momentum 0.9), batch "
        f"{cfg.batch_size}; FedProx μ = {cfg.mu}; seeds {list(cfg.seeds)} (mean ± std over "
        "seeds). Scope spread: mean over clients of Σ_l KL(client ‖ fused scope of the "
        "round's clients), after the last round.",
        "",
        "| method | final acc (%) | best acc (%) | mean acc, last 5 rounds (%) "
        "| scope spread (final) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m, lam in _variants(cfg):
        rs = [r for r in runs if r.method == m and r.lam == lam]
        lines.append(
            f"| {_label(m, lam)} | {_ms([r.accuracy[-1] for r in rs], 100, 1)} "
            f"| {_ms([max(r.accuracy) for r in rs], 100, 1)} "
            f"| {_ms([np.mean(r.accuracy[-5:]) for r in rs], 100, 1)} "
            f"| {_ms([r.spread[-1] for r in rs], 1e3, 2)} e-3 |"
        )
    if pairs:
        lines += [
            "",
            f"Pair: two models from different seeds, {cfg.pair_epochs} epochs on all data, "
            f"plain or toward one target scope (WSA λ = {cfg.pair_lam:g}); barriers of the "
            f"linear path on the test set ({cfg.points} points, Git Re-Basin form), before / "
            "after weight matching (WM):",
            "",
            "| training | endpoint acc (%) | scope KL(A‖B) | loss barrier | error barrier (%) "
            "| loss barrier, WM | error barrier, WM (%) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, label in PAIR_VARIANTS.items():

            def p(key: str, scale: float = 1.0, digits: int = 3, name: str = name) -> str:
                return _ms([q[f"{name}_{key}"] for q in pairs], scale, digits)

            lines.append(
                f"| {label} | {p('acc', 100, 1)} | {p('scope_kl', 1e3, 2)} e-3 "
                f"| {p('loss_barrier')} | {p('error_barrier', 100, 1)} "
                f"| {p('loss_barrier_wm')} | {p('error_barrier_wm', 100, 1)} |"
            )
    return "\n".join(lines)


def plot(runs: list[FLRun], cfg: Config, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rounds = np.arange(1, cfg.rounds + 1)
    for m, lam in _variants(cfg):
        rs = [r for r in runs if r.method == m and r.lam == lam]
        for ax, attr, scale in ((axes[0], "accuracy", 100), (axes[1], "spread", 1)):
            v = np.array([getattr(r, attr) for r in rs]) * scale
            mean = v.mean(0)
            sd = v.std(0, ddof=1) if len(rs) > 1 else np.zeros_like(mean)
            ax.plot(rounds, mean, label=_label(m, lam))
            ax.fill_between(rounds, mean - sd, mean + sd, alpha=0.2)
    axes[0].set(xlabel="round", ylabel="global test accuracy (%)", title="accuracy per round")
    axes[1].set(
        xlabel="round",
        ylabel="mean Σ_l KL(client ‖ fused)",
        title="clients' scope spread",
        yscale="log",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"MNIST-1D, {cfg.clients} clients, Dirichlet α={cfg.dirichlet}, {cfg.local_epochs} "
        f"local epoch(s) (mean ± std over {len(cfg.seeds)} seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: Config, *, out: str | None = None, verbose: bool = True) -> dict:
    """The whole experiment; returns ``{"runs", "pairs", "table", "seconds", "config"}``."""
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and load-insensitive
    t0 = time.perf_counter()
    data = make_data(cfg.samples, seed=42)
    runs = []
    for seed in cfg.seeds:
        for m, lam in _variants(cfg):
            t = time.perf_counter()
            runs.append(run_fl(m, data, cfg, seed, lam))
            if verbose:
                r = runs[-1]
                last = list(r.global_std[0])[-1]
                print(
                    f"seed {seed} {_label(m, lam):>22}: final acc {100 * r.accuracy[-1]:.1f}%, "
                    f"std of {last} {r.global_std[0][last]:.3f} -> {r.global_std[-1][last]:.3f} "
                    f"({time.perf_counter() - t:.1f} s)",
                    flush=True,
                )
    pairs = []
    if cfg.pair:
        for s in cfg.seeds:
            t = time.perf_counter()
            pairs.append(run_pair(data, cfg, s))
            if verbose:
                print(f"seed {s} pair part ({time.perf_counter() - t:.1f} s)", flush=True)
    table = summarise(runs, pairs, cfg)
    if out:
        plot(runs, cfg, out)
    seconds = time.perf_counter() - t0
    if verbose:
        print()
        print(table)
        print(f"\n{seconds:.0f} s" + (f"; curves in {out}" if out else ""))
    return {"runs": runs, "pairs": pairs, "table": table, "seconds": seconds, "config": asdict(cfg)}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--local-epochs", type=int)
    ap.add_argument("--clients", type=int)
    ap.add_argument("--dirichlet", type=float)
    ap.add_argument("--lams", type=float, nargs="+", help="WSA weights in the federated part")
    ap.add_argument("--pair-lam", type=float, help="WSA weight in the pair part")
    ap.add_argument("--no-pair", action="store_true", help="skip the pair part")
    ap.add_argument("--target", choices=("fused", "fixed"), help="WSA target schedule")
    ap.add_argument("--out", help="the PNG (default: examples/fl_wsa.png; none with --quick)")
    args = ap.parse_args(argv)
    if args.out is None and not args.quick:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fl_wsa.png")
    cfg = QUICK if args.quick else Config()
    over = {
        "seeds": tuple(args.seeds) if args.seeds else None,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "clients": args.clients,
        "dirichlet": args.dirichlet,
        "lams": tuple(args.lams) if args.lams else None,
        "pair_lam": args.pair_lam,
        "target": args.target,
    }
    cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if args.no_pair:
        cfg = replace(cfg, pair=False)
    return run(cfg, out=args.out)


if __name__ == "__main__":
    main()
