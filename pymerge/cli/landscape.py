"""``pymerge landscape``: loss slices, surfaces, the plane of three models, and a Hessian
summary of checkpoint files.

    pymerge landscape surface CKPT --model mypkg.models:make_net --data data.pt --out surface.png
    pymerge landscape slice   CKPT --model ... --data ... --out slice.png [--direction hessian]
    pymerge landscape plane   A B C --model ... --data ... --out plane.png
    pymerge landscape hessian CKPT --model ... --data ... [--top-k 3] [--trace] [--per-layer]

The model comes from ``--model MODULE:FACTORY``: a Python import path (``mypkg.models``, or a
file ``path/to/models.py``) and the name of a function in it that takes no arguments and
returns the ``nn.Module`` the checkpoints fit. The data come from ``--data``: a ``.pt`` or
``.safetensors`` file holding tensors ``x`` (inputs) and ``y`` (targets), e.g.
``torch.save({"x": x, "y": y}, "data.pt")``. The loss is cross-entropy (``--loss ce``) or mean
squared error (``--loss mse``), averaged over the data. Every output path is checked before any
work; outputs (the PNG, ``--json``) are written all or none, each atomically; inputs are never
modified.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from pymerge.cli._args import int_at_least, seed

__all__ = ["add_parser", "run", "load_factory", "load_data"]

_LOSSES = ("ce", "mse")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser, *, out: bool = True) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="import path (or .py file) and the name of a function returning the nn.Module",
    )
    p.add_argument(
        "--data", required=True, help=".pt or .safetensors file with tensors x (inputs), y"
    )
    p.add_argument("--loss", choices=_LOSSES, default="ce", help="cross-entropy (default) or mse")
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=1024,
        help="samples per forward pass (default 1024)",
    )
    p.add_argument(
        "--max-samples", type=int_at_least(1), default=None, help="use the first N samples only"
    )
    if out:
        p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--json", dest="json_out", help="also write the numbers as JSON here")
    p.add_argument("--seed", type=seed, default=0, help="seed of random directions (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "landscape",
        help="loss slices, surfaces, the plane of three models, Hessian spectra",
        description="Loss-landscape views of checkpoints: a 1-D slice or 2-D surface along "
        "filter-normalised random (or top Hessian eigenvector) directions, the plane "
        "through three models, and a Hessian summary (top eigenvalues, trace). The model "
        "comes from --model MODULE:FACTORY (a function returning the nn.Module; MODULE may "
        "be a .py file), the data from --data (.pt or .safetensors with tensors x and y).",
        epilog="example: pymerge landscape surface net.safetensors --model models.py:make_net "
        "--data data.pt --out surface.png",
    )
    kinds = p.add_subparsers(dest="view", metavar="VIEW", required=True)
    s = kinds.add_parser("slice", help="the loss along one direction (a curve PNG)")
    s.add_argument("checkpoint", help="the model's checkpoint (.safetensors or torch)")
    _common(s)
    s.add_argument("--direction", choices=("random", "hessian"), default="random")
    s.add_argument("--steps", type=int_at_least(2), default=51, help="points (default 51)")
    s.add_argument("--span", type=_positive, default=1.0, help="coordinates in [-S, S]")
    f = kinds.add_parser("surface", help="the loss over two directions (a contour PNG)")
    f.add_argument("checkpoint", help="the model's checkpoint (.safetensors or torch)")
    _common(f)
    f.add_argument("--directions", choices=("random", "hessian"), default="random")
    f.add_argument("--steps", type=int_at_least(2), default=21, help="points per axis (default 21)")
    f.add_argument("--span", type=_positive, default=1.0, help="coordinates in [-S, S]")
    pl = kinds.add_parser("plane", help="the loss over the plane through three checkpoints")
    pl.add_argument("a", help="checkpoint A (at (0, 0))")
    pl.add_argument("b", help="checkpoint B (at (1, 0))")
    pl.add_argument("c", help="checkpoint C")
    _common(pl)
    pl.add_argument(
        "--steps", type=int_at_least(2), default=21, help="points per axis (default 21)"
    )
    pl.add_argument(
        "--margin", type=float, default=0.2, help="extent beyond the three (default 0.2)"
    )
    h = kinds.add_parser("hessian", help="top Hessian eigenvalues and trace (a table)")
    h.add_argument("checkpoint", help="the model's checkpoint (.safetensors or torch)")
    _common(h, out=False)
    h.add_argument("--out", help="also plot the spectral density (SLQ) as a PNG here")
    h.add_argument("--top-k", type=int_at_least(1), default=1, help="eigenvalues (default 1)")
    h.add_argument("--trace", action="store_true", help="also estimate the trace (Hutchinson)")
    h.add_argument("--per-layer", action="store_true", help="one row per layer as well")
    h.add_argument("--tol", type=_positive, default=1e-3, help="relative tolerance (1e-3)")
    h.add_argument("--max-iter", type=int_at_least(1), default=100, help="iteration cap (100)")
    return p


# --------------------------------------------------------------------------- inputs


def load_factory(spec: str) -> Any:
    """``MODULE:FACTORY`` -> the ``nn.Module`` that ``FACTORY()`` returns. ``MODULE`` is an
    import path (the current folder is searched too) or a ``.py`` file. ValueError naming
    what is wrong."""
    from torch import nn

    if ":" not in spec:
        raise ValueError(
            f"--model {spec!r} must be MODULE:FACTORY (e.g. mypkg.models:make_net or "
            f"models.py:make_net)"
        )
    module_name, _, factory_name = spec.rpartition(":")
    if not module_name or not factory_name:
        raise ValueError(f"--model {spec!r} must be MODULE:FACTORY, both parts non-empty")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"--model: no Python file at {module_name!r}")
        loader_spec = importlib.util.spec_from_file_location(f"_pymerge_model_{path.stem}", path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"--model: cannot import {module_name!r}")
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise ValueError(f"--model: importing {module_name!r} failed: {exc}") from None
    else:
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"--model: cannot import module {module_name!r} ({exc})") from None
        except Exception as exc:
            raise ValueError(f"--model: importing {module_name!r} failed: {exc}") from None
        finally:
            if added:
                sys.path.remove(os.getcwd())
    factory = getattr(module, factory_name, None)
    if factory is None:
        raise ValueError(f"--model: module {module_name!r} has no {factory_name!r}")
    if not callable(factory):
        raise ValueError(f"--model: {module_name}:{factory_name} is not callable")
    try:
        model = factory()
    except Exception as exc:
        raise ValueError(f"--model: {module_name}:{factory_name}() failed: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"--model: {module_name}:{factory_name}() returned a {type(model).__name__}, "
            f"not an nn.Module"
        )
    return model


def load_data(path: str, max_samples: int | None = None):
    """``(x, y)`` from a ``.pt``/``.safetensors`` file with tensors ``x`` and ``y`` of the
    same length; ValueError naming the file otherwise."""
    from pymerge.io import load_state_dict

    try:
        tensors = load_state_dict(path)
    except ValueError as exc:
        raise ValueError(f"--data: {exc}") from None
    missing = [k for k in ("x", "y") if k not in tensors]
    if missing:
        raise ValueError(
            f"--data {path!r} has no tensor {missing[0]!r} (it has {sorted(tensors)}); save "
            f"one with torch.save({{'x': inputs, 'y': targets}}, path)"
        )
    x, y = tensors["x"], tensors["y"]
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"--data {path!r}: x {tuple(x.shape)} and y {tuple(y.shape)} must have the same "
            f"first dimension (one row per sample)"
        )
    if x.shape[0] == 0:
        raise ValueError(f"--data {path!r} holds no samples")
    if max_samples is not None:
        x, y = x[:max_samples], y[:max_samples]
    return x, y


def loss_from_name(name: str):
    """The ``--loss ce|mse`` choice as a loss function (clear errors on mismatched targets)."""
    import torch.nn.functional as F

    if name == "ce":

        def ce(out, y):
            if y.is_floating_point():
                raise ValueError("--loss ce needs integer class targets y; use --loss mse")
            return F.cross_entropy(out, y)

        return ce

    def mse(out, y):
        if out.shape != y.shape:
            raise ValueError(
                f"--loss mse: the model's outputs {tuple(out.shape)} and y {tuple(y.shape)} "
                f"differ in shape"
            )
        return F.mse_loss(out, y.to(out.dtype))

    return mse


def _model_with(args: argparse.Namespace, path: str):
    """A fresh model from the factory with the checkpoint at ``path`` loaded."""
    from pymerge._util.checks import check_state_pair
    from pymerge.io import load_state_dict

    model = load_factory(args.model)
    state = load_state_dict(path)
    check_state_pair(model.state_dict(), state, f"the model of --model {args.model}", repr(path))
    model.load_state_dict(state)
    return model.eval(), state


def _batches(x, y, size: int):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


def _check_runs(model, batches, loss_fn) -> None:
    """One forward pass on the first batch, so a model/data mismatch is one clear line."""
    import torch

    x, y = batches[0]
    try:
        with torch.no_grad():
            loss_fn(model(x), y)
    except ValueError:
        raise
    except Exception as exc:
        first = " ".join(str(exc).split())[:200]
        raise ValueError(f"the model cannot run on --data: {type(exc).__name__}: {first}") from None


# --------------------------------------------------------------------------- run


def _summary_surface(surface) -> dict[str, Any]:
    import numpy as np

    loss = surface.metrics["loss"]
    finite = loss[np.isfinite(loss)]
    return {
        "directions": surface.directions,
        "coords": [c.tolist() for c in surface.coords],
        "loss": loss.tolist(),
        "points": {k: list(v) for k, v in surface.points.items()},
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "nonfinite": surface.flags.get("nonfinite", {}).get("loss", []),
        "seconds": surface.seconds,
        **{k: v for k, v in surface.extras.items() if k in ("eigenvalues", "distances")},
    }


def _json_writer(data: dict[str, Any]):
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, allow_nan=True)

    return write


def _png_writer(fig):
    return lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight")


def _hessian(args, model, batches, loss_fn, progress: bool) -> tuple[dict[str, Any], Any]:
    from pymerge.landscape.hessian import (
        hessian_density,
        hessian_eigenvalues,
        hessian_trace,
        layer_groups,
    )

    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.top_k > n:
        raise ValueError(f"--top-k {args.top_k} is larger than the model's {n} parameters")
    opts = dict(tol=args.tol, max_iter=args.max_iter, seed=args.seed)
    rows: list[tuple[str, Any, Any]] = []
    eig = hessian_eigenvalues(model, batches, loss_fn, k=args.top_k, progress=progress, **opts)
    tr = (
        hessian_trace(model, batches, loss_fn, seed=args.seed, progress=progress)
        if (args.trace)
        else None
    )
    rows.append(("(model)", eig, tr))
    if args.per_layer:
        groups = layer_groups(model)
        k_of = {
            g: min(args.top_k, sum(dict(model.named_parameters())[p].numel() for p in ps))
            for g, ps in groups.items()
        }
        for g, names in groups.items():
            e = hessian_eigenvalues(model, batches, loss_fn, k=k_of[g], params=names, **opts)
            t = (
                hessian_trace(model, batches, loss_fn, params=names, seed=args.seed)
                if (args.trace)
                else None
            )
            rows.append((g, e, t))
    density = None
    if args.out:
        density = hessian_density(model, batches, loss_fn, seed=args.seed, progress=progress)
    data = {
        "parameters": n,
        "samples": int(eig.extras.get("samples_seen") or 0),
        "hvp": eig.extras.get("hvp"),
        "rows": [
            {
                "block": name,
                "parameters": int(e.extras.get("dim", 0)),
                "eigenvalues": e.values.tolist(),
                "converged": e.converged,
                "trace": None if t is None else float(t.values[0]),
                "trace_std_err": None if t is None else float(t.std_err[0]),
            }
            for name, e, t in rows
        ],
    }
    if density is not None:
        data["density"] = {"grid": density.grid.tolist(), "density": density.density.tolist()}
    return data, density


def _print_hessian(data: dict[str, Any]) -> None:
    print(f"Hessian of the mean loss over {data['samples']} samples ({data['hvp']})")
    print(f"{'block':<24} {'params':>9}  {'top eigenvalues':<36} trace")
    for r in data["rows"]:
        eig = ", ".join(f"{v:.5g}" for v in r["eigenvalues"])
        if not r["converged"]:
            eig += " (not converged)"
        tr = "" if r["trace"] is None else f"{r['trace']:.5g} ± {r['trace_std_err']:.2g}"
        print(f"{r['block']:<24} {r['parameters']:>9}  {eig:<36} {tr}")


def run(args: argparse.Namespace) -> int:
    from pymerge.io import check_output_paths, write_all

    view = args.view
    inputs = {"--data": args.data}
    module = args.model.rpartition(":")[0]
    if module.endswith(".py"):
        inputs["--model"] = module
    if view == "plane":
        inputs.update({"A": args.a, "B": args.b, "C": args.c})
    else:
        inputs["checkpoint"] = args.checkpoint
    outputs = {"--out": args.out, "--json": args.json_out}
    outputs = {k: v for k, v in outputs.items() if v is not None}
    check_output_paths(outputs, inputs=inputs)  # before any work
    if args.out or view != "hessian":
        from pymerge.landscape.plots import require_matplotlib

        try:
            require_matplotlib()  # before any work: the PNG needs it
        except ImportError as exc:
            raise ValueError(str(exc)) from None
    progress = not args.quiet and sys.stderr.isatty()
    x, y = load_data(args.data, args.max_samples)
    batches = _batches(x, y, args.batch_size)
    loss_fn = loss_from_name(args.loss)

    if view == "plane":
        from pymerge._util.checks import check_state_pair
        from pymerge.landscape.plots import plot_surface
        from pymerge.landscape.slices import loss_plane

        model, sa = _model_with(args, args.a)
        _check_runs(model, batches, loss_fn)
        _, sb = _model_with(args, args.b)
        _, sc = _model_with(args, args.c)
        check_state_pair(sa, sb, f"A {args.a!r}", f"B {args.b!r}", same_dtype=True)
        check_state_pair(sa, sc, f"A {args.a!r}", f"C {args.c!r}", same_dtype=True)
        surface = loss_plane(
            model,
            sa,
            sb,
            sc,
            batches,
            loss_fn,
            steps=args.steps,
            margin=args.margin,
            progress=progress,
        )
        fig = plot_surface(surface, title="loss over the plane through A, B, C")
        data = _summary_surface(surface)
    elif view in ("slice", "surface"):
        from pymerge.landscape.plots import plot_slice, plot_surface
        from pymerge.landscape.slices import loss_slice, loss_surface

        model, _ = _model_with(args, args.checkpoint)
        _check_runs(model, batches, loss_fn)
        span = (-args.span, args.span)
        if view == "slice":
            surface = loss_slice(
                model,
                batches,
                loss_fn,
                args.direction,
                span=span,
                steps=args.steps,
                seed=args.seed,
                progress=progress,
            )
            fig = plot_slice(surface)
        else:
            surface = loss_surface(
                model,
                batches,
                loss_fn,
                args.directions,
                span=span,
                steps=args.steps,
                seed=args.seed,
                progress=progress,
            )
            fig = plot_surface(surface)
        data = _summary_surface(surface)
    else:
        model, _ = _model_with(args, args.checkpoint)
        _check_runs(model, batches, loss_fn)
        data, density = _hessian(args, model, batches, loss_fn, progress)
        fig = None
        if density is not None:
            from pymerge.landscape.plots import plot_density

            fig = plot_density(density)

    writers = {}
    if args.out and fig is not None:
        writers[args.out] = _png_writer(fig)
    if args.json_out:
        writers[args.json_out] = _json_writer(data)
    if writers:
        write_all(writers, protect=inputs, labels={v: k for k, v in outputs.items()})
    if not args.quiet:
        if view == "hessian":
            _print_hessian(data)
        else:
            nonfinite = len(data["nonfinite"])
            note = f"; {nonfinite} points with a NaN/inf loss" if nonfinite else ""
            points = surface.extras.get("evaluations", 0)
            if data["min"] is None:
                print(f"the loss is NaN/inf at all {points} points", file=sys.stderr)
            else:
                print(
                    f"loss from {data['min']:.6g} to {data['max']:.6g} over {points} points{note}",
                    file=sys.stderr,
                )
        if writers:
            print(f"wrote {', '.join(map(str, writers))}", file=sys.stderr)
    return 0
