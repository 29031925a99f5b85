"""torch.distributed with the gloo backend and 2 processes on this machine: weight matching
(parameters sharded, costs all-reduced per unit solve) and merging (tensors sharded, each
rank writing its shards, rank 0 the index) give the permutation and the merged tensors of
one process; a failing rank fails every rank and leaves nothing.

One spawn of 2 processes runs every scenario (starting processes is the slow part); the
tests then compare what each rank saved with the one-process results."""

import datetime
import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from test_cli_merge import llama_config, llama_state, save_folder  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

WORLD = 2
GPT = dict(vocab=40, d_model=32, n_heads=4, n_layers=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scenarios(rank, root):
    """Everything the ranks do, in order (module level: spawn pickles it)."""
    from pymerge.align.distributed import distributed_weight_matching
    from pymerge.io import open_checkpoint
    from pymerge.io.distributed import run_job_distributed
    from pymerge.io.merge_config import build_job, load_merge_config
    from pymerge.io.output import CheckpointWriter
    from pymerge.testing.models import TinyGPT

    out = {}
    spec = TinyGPT(**GPT).spec()
    a = open_checkpoint(os.path.join(root, "a.safetensors"))
    b = open_checkpoint(os.path.join(root, "b.safetensors"))
    for greedy in (False, True):
        res = distributed_weight_matching(spec, a, b, seed=1, greedy=greedy)
        out[f"wm{int(greedy)}"] = {
            "perm": res.perm,
            "objective": res.history.objective,
            "owned": res.extras["owned"],
        }
    cfg = os.path.join(root, "m.yaml")
    job = build_job(load_merge_config(cfg), config_path=cfg)
    res = run_job_distributed(job, os.path.join(root, "two"), threads=rank == 0)
    job.close()
    out["merge"] = {"keys": res.stats.keys, "perms": res.perms}

    cfg = os.path.join(root, "fail.yaml")
    job = build_job(load_merge_config(cfg), config_path=cfg)
    if rank == 1:

        def boom(self, key, tensor):
            raise OSError(28, "No space left on device")

        CheckpointWriter.write = boom
    try:
        run_job_distributed(job, os.path.join(root, "failed"), threads=False)
        out["fail"] = None
    except (OSError, RuntimeError, ValueError) as exc:
        out["fail"] = str(exc)
    job.close()
    return out


def _worker(rank, port, root):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save(_scenarios(rank, root), os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The inputs, the one-process results, and what each of the 2 ranks returned."""
    from pymerge.align import weight_matching
    from pymerge.io.merge_config import build_job, load_merge_config
    from pymerge.io.merge_files import run_job
    from pymerge.spec import apply_permutation, random_permutation
    from pymerge.spec.hf import hf_spec
    from pymerge.testing.models import TinyGPT

    root = tmp_path_factory.mktemp("dist")
    states = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        states.append({k: v.clone() for k, v in TinyGPT(**GPT).state_dict().items()})
    save_file(states[0], root / "a.safetensors")
    save_file(states[1], root / "b.safetensors")
    spec = TinyGPT(**GPT).spec()
    one = {g: weight_matching(spec, *states, seed=1, greedy=g) for g in (False, True)}

    base = llama_state(0)
    ft = llama_state(1, base=base)
    lspec = hf_spec(llama_config(), keys=base)
    save_folder(root / "base", base)
    save_folder(root / "ftp", apply_permutation(lspec, random_permutation(lspec, base, seed=4), ft))
    (root / "m.yaml").write_text(
        f"merge_method: linear\nbase_model: {root}/base\nmodels:\n  - model: {root}/ftp\n"
        "    parameters: {weight: 0.7}\nparameters: {weight: 0.3}\nshard_size: 3KB\n"
        "align: {method: weight_matching, max_iter: 10}\n"
    )
    (root / "fail.yaml").write_text(
        f"merge_method: linear\nmodels: [{{model: {root}/base}}, {{model: {root}/ftp}}]\n"
    )
    job = build_job(load_merge_config(root / "m.yaml"), config_path=root / "m.yaml")
    merged = run_job(job, root / "one")
    job.close()

    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return {"root": root, "one_wm": one, "one_merge": merged, "ranks": ranks}


@pytest.mark.parametrize("greedy", [False, True])
def test_two_ranks_find_the_one_process_permutation(run, greedy):
    one = run["one_wm"][greedy]
    got = [r[f"wm{int(greedy)}"] for r in run["ranks"]]
    owned = [set(r["owned"]) for r in got]
    assert owned[0] and owned[1] and not owned[0] & owned[1]  # the parameters are sharded
    for r in got:
        for g in one.perm:
            assert torch.equal(r["perm"][g], one.perm[g]), g
        assert r["objective"] == pytest.approx(one.history.objective, rel=1e-6)


def test_two_ranks_merge_the_one_process_tensors(run):
    """A linear merge with align: (distributed weight matching) over many shards: each rank
    writes its own shards, rank 0 the index; the tensors equal the one-process run's."""
    from pymerge.io import open_checkpoint

    root, one = run["root"], run["one_merge"]
    got = [r["merge"] for r in run["ranks"]]
    assert sum(r["keys"] for r in got) == one.stats.keys and all(r["keys"] for r in got)
    name = str(root / "ftp")
    for r in got:
        for g, p in one.perms[name].items():
            assert torch.equal(r["perms"][name][g], p), g
    a, b = open_checkpoint(root / "one"), open_checkpoint(root / "two")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    index = json.loads((root / "two" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    side = {
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert sorted(os.listdir(root / "two")) == sorted(shards | side)


def test_a_failing_rank_fails_every_rank_and_leaves_nothing(run):
    root = run["root"]
    errors = [r["fail"] for r in run["ranks"]]
    assert "No space left" in errors[1]
    assert "rank 1 failed" in errors[0]
    assert not (root / "failed").exists()
    assert not [n for n in os.listdir(root) if "pymerge-tmp" in n]
