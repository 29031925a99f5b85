"""``pymerge demo``: the library's story in under a minute, on data made here.

1. Make a 10-class data set locally (each class a mixture of Gaussian blobs; torch only).
2. Train two MLPs that differ only in their seed (initialisation and data order).
3. Align B to A with :func:`pymerge.weight_matching` and :func:`pymerge.apply_permutation`.
4. Evaluate the linear paths A → B (naive) and A → π(B) (aligned) with
   :func:`pymerge.interpolation_curve`, and their barriers with :func:`pymerge.loss_barrier`
   and :func:`pymerge.error_barrier`.
5. Merge: the midpoint :func:`pymerge.interpolate` ``([A, π(B)], [0.5, 0.5])``, timed on each
   backend; write a PNG of the curves when matplotlib is installed.
6. Time pymerge's assignment solver against the peers found here (scipy, lapx), every row
   labelled with the backend that ran.

``pymerge demo --quick`` runs the same steps at toy sizes in a few seconds (for tests).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

__all__ = ["add_parser", "run", "DemoConfig", "FULL", "QUICK", "make_blobs", "train_mlp"]

DEFAULT_PNG = "pymerge-demo.png"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run."""

    dim: int  # input features
    blobs: int  # Gaussian blobs per class
    noise: float  # standard deviation of each blob (centres are standard normal)
    width: int  # hidden units per layer
    depth: int  # hidden layers
    epochs: int
    train_size: int
    test_size: int
    points: int  # λ values on each curve (odd, so that λ = 0.5 is one of them)
    sizes: tuple[int, ...]  # assignment comparison: square weight-matching costs
    batch: tuple[int, int, int] | None  # assignment comparison: a batch of small problems
    repeat: int = 3


FULL = DemoConfig(32, 6, 1.0, 256, 3, 10, 12_000, 4_000, 11, (1024,), (1000, 64, 64))
QUICK = DemoConfig(8, 2, 0.5, 32, 2, 3, 2000, 500, 5, (24,), (4, 8, 8), repeat=1)

SEEDS = (0, 1)
CLASSES = 10


# --------------------------------------------------------------------------- data, training


@dataclass
class Data:
    x_train: object  # torch.Tensor float32 [N, dim]
    y_train: object  # torch.Tensor int64 [N]
    x_test: object
    y_test: object


def make_blobs(cfg: DemoConfig, seed: int = 1234) -> Data:
    """``CLASSES`` classes, each a mixture of ``cfg.blobs`` isotropic Gaussian blobs in
    ``cfg.dim`` dimensions (centres standard normal, spread ``cfg.noise``): a nonlinear
    problem that a small MLP learns in seconds. Train and test points are drawn independently."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES * cfg.blobs, cfg.dim, generator=gen)

    def draw(n: int):
        blob = torch.randint(0, CLASSES * cfg.blobs, (n,), generator=gen)
        x = centres[blob] + cfg.noise * torch.randn(n, cfg.dim, generator=gen)
        return x, blob % CLASSES

    x_train, y_train = draw(cfg.train_size)
    x_test, y_test = draw(cfg.test_size)
    return Data(x_train, y_train, x_test, y_test)


def make_model(cfg: DemoConfig):
    from pymerge.testing.models import MLP

    return MLP(cfg.dim, (cfg.width,) * cfg.depth, CLASSES)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block (small matmuls are fastest on one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_mlp(cfg: DemoConfig, data: Data, seed: int, *, progress: bool = False):
    """Train :func:`make_model` from ``seed`` (initialisation and minibatch order) with Adam
    (lr 2e-3, cosine decay, batch 128); returns ``(model, detached state dict)``."""
    import torch
    import torch.nn.functional as F

    from pymerge._util.progress import track

    torch.manual_seed(seed)
    model = make_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    n, batch = cfg.train_size, 128
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * -(-n // batch))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in track(range(cfg.epochs), progress, desc=f"training seed {seed}", unit="epoch"):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def evaluate(model, x, y) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(x)
        return {
            "loss": float(F.cross_entropy(logits, y)),
            "accuracy": float((logits.argmax(1) == y).float().mean()),
        }


# --------------------------------------------------------------------------- output


def _say(text: str = "") -> None:
    print(text, flush=True)


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _curve_table(lambdas, curves: Mapping[str, object]) -> list[str]:
    head = "      λ              " + " ".join(f"{lam:5.2f}" for lam in lambdas)
    lines = [head]
    for name, curve in curves.items():
        lines.append(f"      {name + ' loss':<15}" + " ".join(f"{v:5.2f}" for v in curve["loss"]))
    for name, curve in curves.items():
        lines.append(
            f"      {name + ' acc %':<15}" + " ".join(f"{100 * v:5.1f}" for v in curve["accuracy"])
        )
    return lines


def _plot_writer(curves: Mapping[str, object], title: str):
    """A writer for :func:`pymerge.io.write_all` that saves the curves as a PNG (no pyplot,
    so no global matplotlib state changes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for name, curve in curves.items():
        ax_loss.plot(curve.lambdas, curve["loss"], marker="o", label=name)
        ax_acc.plot(curve.lambdas, 100 * curve["accuracy"], marker="o", label=name)
    ax_loss.set(xlabel="λ  ((1-λ)·A + λ·B)", ylabel="test loss", title="loss")
    ax_acc.set(xlabel="λ  ((1-λ)·A + λ·B)", ylabel="test accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return lambda tmp: fig.savefig(tmp, format="png", dpi=110)


def _matplotlib_missing() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def _median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# --------------------------------------------------------------------------- the command


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="train, align, compare and merge two small networks (under a minute)",
        description="Train two MLPs from different seeds on a data set made here, align them "
        "with weight matching, show the loss/accuracy barrier of the naive and the aligned "
        "linear path, merge them, write a PNG of the curves (with matplotlib), and time "
        "pymerge's assignment solver against the peers found (scipy, lapx).",
    )
    p.add_argument("--quick", action="store_true", help="toy sizes, a few seconds (for tests)")
    p.add_argument(
        "--png",
        default=DEFAULT_PNG,
        metavar="PATH",
        help=f"where to write the plot of the curves (default ./{DEFAULT_PNG})",
    )
    p.add_argument("--no-png", action="store_true", help="do not write the plot")
    p.add_argument("--no-bench", action="store_true", help="skip the assignment comparison")
    return p


@dataclass
class _Run:
    """What the steps of one demo run share."""

    cfg: DemoConfig
    steps: int
    data: Data | None = None
    model: object = None  # model A (its architecture is used for the curves)
    a: dict | None = None
    b: dict | None = None
    b_aligned: dict | None = None
    curves: dict | None = None

    def say(self, step: int, text: str) -> None:
        _say(f"[{step}/{self.steps}] {text}")

    @property
    def shape(self) -> str:
        cfg = self.cfg
        return "-".join(map(str, (cfg.dim, *(cfg.width,) * cfg.depth, CLASSES)))

    def accuracy(self, state) -> float:
        model = make_model(self.cfg)
        model.load_state_dict(state)
        with _threads(1):
            return evaluate(model, self.data.x_test, self.data.y_test)["accuracy"]


def _step_data(r: _Run) -> None:
    cfg = r.cfg
    _say()
    r.say(
        1,
        f"data: {CLASSES} classes, each a mixture of {cfg.blobs} Gaussian blobs in {cfg.dim}-D, "
        f"made here ({cfg.train_size} training / {cfg.test_size} test points)",
    )
    r.data = make_blobs(cfg)


def _step_train(r: _Run, progress: bool) -> None:
    t0 = time.perf_counter()
    with _threads(1):
        (r.model, r.a), (_, r.b) = (train_mlp(r.cfg, r.data, s, progress=progress) for s in SEEDS)
    acc_a, acc_b = r.accuracy(r.a), r.accuracy(r.b)
    r.say(
        2,
        f"trained two MLPs {r.shape} from seeds {SEEDS[0]} and {SEEDS[1]} (Adam, "
        f"{r.cfg.epochs} epochs) in {time.perf_counter() - t0:.1f} s: test accuracy "
        f"A {_pct(acc_a)}, B {_pct(acc_b)}",
    )


def _step_align(r: _Run) -> None:
    from pymerge._backend import backends
    from pymerge.align import weight_matching
    from pymerge.cli._compare import native_label
    from pymerge.spec import apply_permutation

    spec = r.model.spec()
    assignment = native_label() if backends()["assignment"] == "native" else "NumPy fallback"
    t0 = time.perf_counter()
    result = weight_matching(spec, r.a, r.b, max_iter=100, seed=0, progress=False)
    seconds = time.perf_counter() - t0
    r.b_aligned = apply_permutation(spec, result.perm, r.b)
    objective = result.history.objective
    sweeps = len(objective)
    final = f", objective {objective[-1]:.4g}" if objective else ""
    r.say(
        3,
        f"aligned B to A: pymerge.weight_matching(spec, A, B) in {seconds:.2f} s, {sweeps} "
        f"sweep{'s' * (sweeps != 1)}{final} (assignment: {assignment}); "
        f"pymerge.apply_permutation(spec, perm, B) -> π(B)",
    )


def _step_curves(r: _Run) -> None:
    from pymerge.landscape import error_barrier, interpolation_curve, loss_barrier

    def eval_fn(model):
        return evaluate(model, r.data.x_test, r.data.y_test)

    t0 = time.perf_counter()
    points = r.cfg.points
    with _threads(1):
        r.curves = {
            "naive": interpolation_curve(r.model, r.a, r.b, eval_fn, lambdas=points),
            "aligned": interpolation_curve(r.model, r.a, r.b_aligned, eval_fn, lambdas=points),
        }
    r.say(
        4,
        f"linear paths (1-λ)·A + λ·B and (1-λ)·A + λ·π(B), {points} points each: "
        f"pymerge.interpolation_curve in {time.perf_counter() - t0:.2f} s",
    )
    for line in _curve_table(r.curves["naive"].lambdas, r.curves):
        _say(line)
    loss = {k: loss_barrier(c) for k, c in r.curves.items()}
    err = {k: error_barrier(c) for k, c in r.curves.items()}
    lower = (
        f" ({100 * (1 - loss['aligned'] / loss['naive']):.0f} % lower)" if loss["naive"] > 0 else ""
    )
    _say(
        f"      loss barrier (pymerge.loss_barrier): naive {loss['naive']:.3f}, aligned "
        f"{loss['aligned']:.3f}{lower}"
    )
    _say(
        f"      error barrier (pymerge.error_barrier): naive {100 * err['naive']:.1f} points, "
        f"aligned {100 * err['aligned']:.1f} points"
    )


def _step_merge(r: _Run, repeat: int) -> None:
    from pymerge._backend import backends
    from pymerge.cli._compare import multi_tensor_label
    from pymerge.ops import interpolate

    acc_merged = r.accuracy(interpolate([r.a, r.b_aligned], [0.5, 0.5]))
    acc_plain = r.accuracy(interpolate([r.a, r.b], [0.5, 0.5]))
    timed = []
    native = ["native"] if backends()["kernels_cpu"] == "native" else []
    # one thread, as for training: on a busy 2-core machine torch's hand-off to a second
    # thread costs more than this small merge itself
    with _threads(1):
        for backend in [*native, "torch"]:
            ms = _median_ms(
                lambda be=backend: interpolate([r.a, r.b_aligned], [0.5, 0.5], backend=be),
                repeat,
            )
            label = multi_tensor_label() if backend == "native" else "torch"
            timed.append(f"{label} {ms:.3f} ms")
    r.say(
        5,
        f"merged: pymerge.interpolate([A, π(B)], [0.5, 0.5]) -> test accuracy "
        f"{_pct(acc_merged)} (the plain average of A and B: {_pct(acc_plain)}); "
        f"time per merge on one thread: {' · '.join(timed)}",
    )


def _step_plot(r: _Run, png: str | None) -> None:
    """Write the PNG (``png`` checked before any work), or say how to get one."""
    if png is None:
        _say(
            "      plot: matplotlib is not installed; add it with `pip install matplotlib` "
            '(from the checkout: `pip install ".[plot]"`) to get the PNG of the curves'
        )
        return
    from pymerge.io import write_all

    title = f"two MLPs {r.shape}, seeds {SEEDS[0]} and {SEEDS[1]}: naive vs weight-matched"
    write_all({png: _plot_writer(r.curves, title)}, labels={png: "--png"})
    _say(f"      plot: wrote {png}")


def _step_bench(r: _Run) -> bool:
    from pymerge.cli import _compare

    _say()
    r.say(6, "assignment solvers on this machine (`pymerge bench` for more cases):")
    cfg = r.cfg
    rows = _compare.quick_comparison(
        cfg.sizes, repeat=cfg.repeat, batch=cfg.batch, warm_n=None, kinds=("wm32",)
    )
    _say(_compare.format_table(rows))
    _say(_compare.table_note(rows))
    if not all(row.ok for row in rows):
        _say("error: a solver's optimum disagrees with pymerge's (see the note column)")
        return False
    return True


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    from pymerge import __version__
    from pymerge.cli import _compare
    from pymerge.io import check_output_paths

    png = None if args.no_png or _matplotlib_missing() else args.png
    if png is not None:  # every output checked before any work
        check_output_paths({"--png": png})

    _say(f"pymerge {__version__} (imported from {_compare.package_dir()})")
    _say(_compare.backend_line())
    warning = _compare.missing_native_warning()
    if warning:
        _say(warning)
    if not args.no_bench:
        _say(_compare.peers_line())

    r = _Run(QUICK if args.quick else FULL, steps=5 if args.no_bench else 6)
    _step_data(r)
    _step_train(r, progress=sys.stderr.isatty() and not args.quick)
    _step_align(r)
    _step_curves(r)
    _step_merge(r, repeat=5 if args.quick else 25)
    if not args.no_png:
        _step_plot(r, png)
    if not args.no_bench and not _step_bench(r):
        return 1
    _say(f"\ndone in {time.perf_counter() - t_start:.1f} s")
    return 0
