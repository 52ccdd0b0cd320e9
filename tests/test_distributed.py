"""funcbnn on torch.distributed: two gloo processes on the loopback interface equal one process."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _distributed_worker as worker
from optree import tree_leaves as optree_leaves
from funcbnn import distributed, ensemble, functionalize, swag

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp_path, scenario: str) -> list[dict]:
    mp.spawn(worker.run, args=(2, _free_port(), str(tmp_path), scenario), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def fitters(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("fitters"), "fitters")


def test_data_parallel_swag_equals_one_process_on_the_concatenated_batches(fitters):
    apply_fn, params, _ = functionalize(worker.net())
    want = swag.fit(apply_fn, params, worker.swag_batches(), "classification", epochs=3, lr=0.05,
                    collect_every=4, max_rank=3)
    for r, got in enumerate(fitters):
        assert "error" not in got, got.get("traceback")
        res = got["swag"]
        torch.testing.assert_close(res.history, want.history, rtol=1e-5, atol=1e-6)
        for k in params:
            torch.testing.assert_close(res.params[k], want.params[k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(res.state.mean[k], want.state.mean[k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(res.state.sq_mean[k], want.state.sq_mean[k], rtol=1e-5, atol=1e-6)
        assert int(res.state.num_models) == int(want.state.num_models)


def test_ensemble_members_spread_over_ranks_equal_one_process(fitters):
    apply_fn, _, _ = functionalize(worker.net())
    members = ensemble.init_members(worker.net(), 3, generator=torch.Generator().manual_seed(1))
    want = ensemble.fit(apply_fn, members, worker.data(), epochs=2, batch_size=8, method="vmap",
                        generator=torch.Generator().manual_seed(2))
    one = ensemble.init_members(worker.net(), 1, generator=torch.Generator().manual_seed(1))
    want_one = ensemble.fit(apply_fn, one, worker.data(), epochs=1, batch_size=8, method="loop",
                            generator=torch.Generator().manual_seed(2))
    for got in fitters:
        for key, ref in (("ensemble", want), ("ensemble_one", want_one)):
            res = got[key]
            torch.testing.assert_close(res.history, ref.history, rtol=1e-5, atol=1e-6)
            for k in ref.state.members:
                torch.testing.assert_close(res.state.members[k], ref.state.members[k], rtol=1e-5, atol=1e-6)


def test_data_parallel_vi_equals_one_process_on_the_concatenated_batches(fitters):
    import funcbnn

    apply_fn, params, _ = functionalize(worker.net())
    post, prior = funcbnn.diag_gaussian(init_std=0.05), funcbnn.priors.gaussian(1.0)
    want = funcbnn.vi.fit(apply_fn, post, prior, post.init(params), worker.vi_batches(), epochs=2, num_samples=2, num_data=24,
                          generator=torch.Generator().manual_seed(4))
    for got in fitters:
        res = got["vi"]
        for a, b in zip(res.history, want.history):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(optree_leaves(res.state), optree_leaves(want.state)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sharded_prediction_equals_one_process(fitters):
    import funcbnn

    apply_fn, samples, x = worker.predict_inputs()
    want = funcbnn.sample_outputs(apply_fn, samples, x)
    want_one = funcbnn.sample_outputs(apply_fn, {k: v[:1] for k, v in samples.items()}, x)
    for got in fitters:
        torch.testing.assert_close(got["predict_samples"], want)
        torch.testing.assert_close(got["predict_data"], want)
        torch.testing.assert_close(got["predict_one"], want_one)


def test_laplace_on_sharded_data_equals_one_process_on_the_whole_data(fitters):
    import funcbnn

    apply_fn, params, _ = functionalize(worker.net())
    x, y = worker.data(10)
    for key, structure in (("laplace_diag", "diag"), ("laplace_kron", "kron"), ("laplace_full", "full"),
                           ("laplace_empty", "diag")):
        la, st = funcbnn.laplace.fit(apply_fn, params, [(x, y)], "classification", structure=structure)
        want = (la.log_marglik(st), la.predict(st, x), st.loss, st.num_data)
        for got in fitters:
            for a, b in zip(got[key], want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)


def test_data_parallel_marglik_training_equals_one_process(fitters):
    import funcbnn

    apply_fn, params, _ = functionalize(worker.net())
    res = funcbnn.laplace.marglik_training(apply_fn, params, worker.vi_batches(), "classification", structure="diag",
                                           epochs=3, lr=1e-2, num_data=24)
    want = (res.info.loss, res.info.log_marglik, res.state.prior_precision)
    for got in fitters:
        for a, b in zip(got["marglik"], want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_rank_with_different_parameters_is_an_error_on_every_rank(tmp_path):
    results = _spawn(tmp_path, "mismatch")
    for got in results:
        assert "ranks disagree on params" in got.get("error", ""), got


def test_different_sample_counts_are_an_error_on_every_rank(tmp_path):
    results = _spawn(tmp_path, "sample_counts")
    for got in results:
        assert "ranks disagree on samples" in got.get("error", ""), got


def test_process_group_without_an_initialised_backend_is_named():
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.world(object())


def test_shard_ranges_cover_every_index_once():
    for n in range(0, 9):
        for size in range(1, 4):
            parts = [list(distributed.shard_range(n, r, size)) for r in range(size)]
            assert sum(parts, []) == list(range(n))
