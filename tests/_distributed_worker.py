"""Worker processes for tests/test_distributed.py: two gloo ranks on the loopback interface.

Each scenario runs the distributed call on its rank and saves what it got (or the
error it raised) to ``out_dir/rank{r}.pt``; the test compares with one process.
"""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return x, y


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def swag_batches(rank=None):
    """8 batches of 6 rows; with a rank, that rank's uneven share: rows [0, 4) to rank 0, [4, 6) to rank 1."""
    x, y = data(48)
    batches = [(x[i : i + 6], y[i : i + 6]) for i in range(0, 48, 6)]
    if rank is None:
        return batches
    cut = slice(0, 4) if rank == 0 else slice(4, 6)
    return [(bx[cut], by[cut]) for bx, by in batches]


def vi_batches(rank=None):
    """2 batches of 12 rows; with a rank, its uneven share: rows [0, 8) to rank 0, [8, 12) to rank 1."""
    x, y = data(24)
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    if rank is None:
        return batches
    cut = slice(0, 8) if rank == 0 else slice(8, 12)
    return [(bx[cut], by[cut]) for bx, by in batches]


def predict_inputs():
    import funcbnn

    apply_fn, params, _ = funcbnn.functionalize(net())
    post = funcbnn.diag_gaussian(init_std=0.2)
    samples = post.sample(post.init(params), 5, generator=torch.Generator().manual_seed(3))
    return apply_fn, samples, data(7)[0]


def run(rank: int, world_size: int, port: int, out_dir: str, scenario: str) -> None:
    import funcbnn
    from funcbnn import ensemble, swag

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )
    torch.set_num_threads(1)
    group = dist.group.WORLD
    result = {}
    try:
        apply_fn, params, _ = funcbnn.functionalize(net())
        if scenario == "fitters":
            res = swag.fit(apply_fn, params, swag_batches(rank), "classification", epochs=3, lr=0.05,
                           collect_every=4, max_rank=3, process_group=group)
            result["swag"] = res
            members = ensemble.init_members(net(), 3, generator=torch.Generator().manual_seed(1))
            result["ensemble"] = ensemble.fit(apply_fn, members, data(), epochs=2, batch_size=8, method="vmap",
                                              generator=torch.Generator().manual_seed(2), process_group=group)
            one = ensemble.init_members(net(), 1, generator=torch.Generator().manual_seed(1))  # rank 1: no member
            result["ensemble_one"] = ensemble.fit(apply_fn, one, data(), epochs=1, batch_size=8, method="loop",
                                                  generator=torch.Generator().manual_seed(2), process_group=group)
            post, prior = funcbnn.diag_gaussian(init_std=0.05), funcbnn.priors.gaussian(1.0)
            result["vi"] = funcbnn.vi.fit(apply_fn, post, prior, post.init(params), vi_batches(rank), epochs=2, num_data=24,
                                          num_samples=2, generator=torch.Generator().manual_seed(4), process_group=group)
            p_fn, samples, x = predict_inputs()
            result["predict_samples"] = funcbnn.sample_outputs(p_fn, samples, x, process_group=group)
            result["predict_data"] = funcbnn.sample_outputs(p_fn, samples, x, process_group=group, shard="data")
            one = {k: v[:1] for k, v in samples.items()}  # rank 1's block of samples is empty
            result["predict_one"] = funcbnn.sample_outputs(p_fn, one, x, process_group=group)
            x, y = data(10)
            shard = [(x[:7], y[:7])] if rank == 0 else [(x[7:], y[7:])]
            for structure in ("diag", "kron", "full"):
                la, st = funcbnn.laplace.fit(apply_fn, params, shard, "classification", structure=structure,
                                             process_group=group)
                result[f"laplace_{structure}"] = (la.log_marglik(st), la.predict(st, x), st.loss, st.num_data)
            la, st = funcbnn.laplace.fit(apply_fn, params, [(x, y)] if rank == 0 else [], "classification",
                                         process_group=group)  # rank 1: an empty shard
            res = funcbnn.laplace.marglik_training(apply_fn, params, vi_batches(rank), "classification",
                                                   structure="diag", epochs=3, lr=1e-2, num_data=24,
                                                   process_group=group)
            result["marglik"] = (res.info.loss, res.info.log_marglik, res.state.prior_precision)
            result["laplace_empty"] = (la.log_marglik(st), la.predict(st, x), st.loss, st.num_data)
        elif scenario == "mismatch":
            if rank == 1:
                params = {k: v + 1.0 for k, v in params.items()}  # a rank whose parameters differ from rank 0's
            swag.fit(apply_fn, params, swag_batches(rank), "classification", epochs=1, process_group=group)
        elif scenario == "sample_counts":
            p_fn, samples, x = predict_inputs()
            if rank == 1:
                samples = {k: v[:4] for k, v in samples.items()}  # different sample counts
            funcbnn.sample_outputs(p_fn, samples, x, process_group=group)
    except Exception as err:  # noqa: BLE001 - the test inspects what each rank raised
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
