"""funcbnn.metrics against scikit-learn, torch.distributions, numerical integration and hand-computed cases."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import funcbnn.metrics as M


def _probs(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(*shape, generator=g, dtype=dtype)).softmax(-1)


def _labels(n: int, c: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


def _sk():
    return pytest.importorskip("sklearn.metrics")


def test_docstring_examples_run():
    result = doctest.testmod(M, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 20 and result.failed == 0


# --- classification -----------------------------------------------------------------------------


def test_accuracy_nll_brier_equal_sklearn():
    sk = _sk()
    probs, y = _probs(200, 4), _labels(200, 4)
    assert float(M.accuracy(probs, y)) == pytest.approx(
        sk.accuracy_score(y.numpy(), probs.argmax(-1).numpy())
    )
    assert float(M.nll(probs, y)) == pytest.approx(
        sk.log_loss(y.numpy(), probs.numpy(), labels=[0, 1, 2, 3]), rel=1e-12
    )
    assert float(M.brier(probs, y)) == pytest.approx(
        sk.brier_score_loss(y.numpy(), probs.numpy(), labels=[0, 1, 2, 3], scale_by_half=False), rel=1e-12
    )


def test_binary_brier_is_twice_sklearns_positive_class_score():
    sk = _sk()
    probs, y = _probs(100, 2, seed=3), _labels(100, 2, seed=4)
    assert float(M.brier(probs, y)) == pytest.approx(
        2 * sk.brier_score_loss(y.numpy(), probs[:, 1].numpy()), rel=1e-12
    )


def test_nll_of_a_zero_probability_is_finite_and_large():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    value = M.nll(probs, torch.tensor([1, 0]))
    assert torch.isfinite(value) and value > 40


def test_batched_classification_metrics_equal_one_call_per_batch_entry():
    probs, y = _probs(3, 2, 50, 5), _labels(50, 5)
    for fn in (M.accuracy, M.nll, M.brier, M.ece, M.adaptive_ece):
        batched = fn(probs, y)
        assert batched.shape == (3, 2)
        looped = torch.stack([torch.stack([fn(probs[i, j], y) for j in range(2)]) for i in range(3)])
        torch.testing.assert_close(batched, looped)
    # per-entry labels broadcast too
    y2 = torch.stack([_labels(50, 5, seed=s) for s in range(2)])
    torch.testing.assert_close(
        M.nll(probs, y2),
        torch.stack([torch.stack([M.nll(probs[i, j], y2[j]) for j in range(2)]) for i in range(3)]),
    )


def _ece_loop(probs: torch.Tensor, y: torch.Tensor, num_bins: int) -> float:
    conf, pred = probs.max(-1)
    total = 0.0
    for b in range(num_bins):
        lo, hi = b / num_bins, (b + 1) / num_bins
        mask = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if mask.any():
            total += (
                mask.sum().item()
                / len(y)
                * abs(conf[mask].mean().item() - (pred[mask] == y[mask]).double().mean().item())
            )
    return total


def test_ece_equals_a_loop_over_bins_and_reliability_bins_add_up():
    probs, y = _probs(500, 3, seed=5), _labels(500, 3, seed=6)
    for bins in (1, 7, 15):
        assert float(M.ece(probs, y, num_bins=bins)) == pytest.approx(_ece_loop(probs, y, bins), abs=1e-12)
    r = M.reliability(probs, y)
    assert r.counts.sum() == 500 and r.edges.shape == (16,) and r.confidence.shape == (15,)
    conf = probs.max(-1).values
    nonempty = r.counts > 0
    assert bool(
        (
            (r.confidence[nonempty] > r.edges[:-1][nonempty])
            & (r.confidence[nonempty] <= r.edges[1:][nonempty])
        ).all()
    )
    assert float((r.counts * r.confidence).sum()) == pytest.approx(float(conf.sum()))


def test_ece_hand_computed_and_bin_edges_are_right_closed():
    # confidences 0.6, 0.8 (right edge of bin 3 of 5), 1.0: right-closed bins put 0.8 with 0.6, 1.0 in the last
    probs = torch.tensor([[0.6, 0.4], [0.8, 0.2], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    r = M.reliability(probs, y, num_bins=5)
    assert r.counts.tolist() == [0, 0, 1, 1, 1]
    # bins (0.4,0.6]: conf .6 acc 1; (0.6,0.8]: conf .8 acc 0; (0.8,1]: conf 1 acc 1 -> (0.4 + 0.8 + 0) / 3
    assert float(r.ece) == pytest.approx(0.4, abs=1e-12)
    assert float(M.ece(probs, y, num_bins=1)) == pytest.approx(abs(0.8 - 2 / 3), abs=1e-12)


def test_ece_is_zero_when_every_bin_is_exactly_calibrated_and_small_for_sampled_labels():
    # 10 examples at confidence 0.7 of which 7 are right
    probs = torch.tensor([[0.7, 0.3]] * 10, dtype=torch.float64)
    y = torch.tensor([0] * 7 + [1] * 3)
    assert float(M.ece(probs, y)) == pytest.approx(0.0, abs=1e-12)
    assert float(M.adaptive_ece(probs, y, num_bins=1)) == pytest.approx(0.0, abs=1e-12)
    # labels drawn from the predicted probabilities: calibrated up to sampling noise
    probs = _probs(20000, 3, seed=7)
    y = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(8)).squeeze(-1)
    assert float(M.ece(probs, y)) < 0.02
    overconfident = (probs.log() * 3).softmax(-1)
    assert float(M.ece(overconfident, y)) > 0.1


def test_adaptive_ece_uses_equal_mass_bins():
    probs, y = _probs(300, 4, seed=9), _labels(300, 4, seed=10)
    conf, pred = probs.max(-1)
    order = conf.argsort()
    total = 0.0
    for chunk in order.chunk(15):  # 300 / 15 = 20 per bin
        total += (
            len(chunk)
            / 300
            * abs(conf[chunk].mean().item() - (pred[chunk] == y[chunk]).double().mean().item())
        )
    assert float(M.adaptive_ece(probs, y)) == pytest.approx(total, abs=1e-12)
    # with fewer examples than bins, every example is its own bin: mean |conf - correct|
    small, ys = probs[:5], y[:5]
    c, p = small.max(-1)
    assert float(M.adaptive_ece(small, ys)) == pytest.approx(
        float((c - (p == ys).double()).abs().mean()), abs=1e-12
    )


# --- ranking metrics ----------------------------------------------------------------------------


def test_auroc_and_average_precision_equal_sklearn_with_ties():
    sk = _sk()
    g = torch.Generator().manual_seed(11)
    for trial in range(5):
        n = 60 + 20 * trial
        targets = torch.randint(0, 2, (n,), generator=g)
        scores = (torch.randn(n, generator=g, dtype=torch.float64) + targets).mul(2).round() / 2  # many ties
        assert float(M.auroc(scores, targets)) == pytest.approx(
            sk.roc_auc_score(targets.numpy(), scores.numpy()), abs=1e-12
        )
        assert float(M.average_precision(scores, targets)) == pytest.approx(
            sk.average_precision_score(targets.numpy(), scores.numpy()), abs=1e-12
        )


def test_auroc_hand_computed_and_ood_convenience():
    # positives {0.35, 0.8}, negatives {0.1, 0.4}: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4
    assert float(M.auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))) == 0.75
    # all tied: 1/2
    assert float(M.auroc(torch.zeros(4), torch.tensor([0, 1, 0, 1]))) == 0.5
    # AP with all scores tied is the positive rate
    assert float(M.average_precision(torch.zeros(4), torch.tensor([0, 1, 0, 0]))) == 0.25
    s_in, s_out = (
        torch.rand(30, generator=torch.Generator().manual_seed(1)),
        torch.rand(20, generator=torch.Generator().manual_seed(2)),
    )
    assert float(M.ood_auroc(s_in, s_out) + M.ood_auroc(s_out, s_in)) == pytest.approx(1.0)
    assert float(M.ood_auroc(s_in, s_in + 2)) == 1.0 and float(M.ood_aupr(s_in, s_in + 2)) == 1.0


def test_ranking_metrics_batched():
    g = torch.Generator().manual_seed(12)
    scores = torch.randn(4, 3, 50, generator=g).round()
    targets = torch.randint(0, 2, (50,), generator=g)
    for fn in (M.auroc, M.average_precision):
        out = fn(scores, targets)
        assert out.shape == (4, 3)
        torch.testing.assert_close(
            out, torch.stack([torch.stack([fn(scores[i, j], targets) for j in range(3)]) for i in range(4)])
        )
    s_out = torch.randn(4, 3, 20, generator=g)
    assert M.ood_auroc(scores, s_out).shape == (4, 3)


def test_aurc_equals_the_mean_risk_over_coverages_without_ties():
    g = torch.Generator().manual_seed(13)
    conf = torch.rand(40, generator=g, dtype=torch.float64)
    errors = torch.randint(0, 2, (40,), generator=g)
    order = conf.argsort(descending=True)
    e = errors[order].double()
    expected = (e.cumsum(0) / torch.arange(1, 41)).mean()
    assert float(M.aurc(conf, errors)) == pytest.approx(float(expected), abs=1e-12)
    rc = M.risk_coverage(conf, errors)
    assert float(rc.coverage[-1]) == 1.0 and float(rc.risk[-1]) == pytest.approx(float(e.mean()))
    # the best ordering (errors last) gives the lowest area; real-valued losses are accepted
    assert float(M.aurc(-errors.double(), errors)) <= float(M.aurc(conf, errors))
    assert float(M.aurc(conf, errors.double() * 2.5)) == pytest.approx(2.5 * float(expected))


def test_aurc_ties_share_their_groups_point_and_do_not_depend_on_order():
    conf = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1])
    errors = torch.tensor([0, 1, 0, 0, 1])
    rc = M.risk_coverage(conf, errors)
    # coverages 1/5, then 4/5 for the whole tied group, then 5/5
    torch.testing.assert_close(rc.coverage, torch.tensor([0.2, 0.8, 0.8, 0.8, 1.0]))
    torch.testing.assert_close(rc.risk, torch.tensor([0.0, 0.25, 0.25, 0.25, 0.4]))
    perm = torch.tensor([0, 3, 2, 1, 4])
    assert float(M.aurc(conf[perm], errors[perm])) == pytest.approx(float(rc.aurc))


# --- regression ---------------------------------------------------------------------------------


def test_rmse_equals_sklearn():
    sk = _sk()
    g = torch.Generator().manual_seed(14)
    m, y = (
        torch.randn(30, generator=g, dtype=torch.float64),
        torch.randn(30, generator=g, dtype=torch.float64),
    )
    assert float(M.rmse(m, y)) == pytest.approx(
        math.sqrt(sk.mean_squared_error(y.numpy(), m.numpy())), rel=1e-12
    )


def test_gaussian_nll_equals_torch_distributions():
    g = torch.Generator().manual_seed(15)
    m, y = (
        torch.randn(2, 30, generator=g, dtype=torch.float64),
        torch.randn(30, generator=g, dtype=torch.float64),
    )
    var = torch.rand(2, 30, generator=g, dtype=torch.float64) + 0.1
    expected = -torch.distributions.Normal(m, var.sqrt()).log_prob(y).mean(-1)
    torch.testing.assert_close(M.gaussian_nll(m, var, y), expected)
    torch.testing.assert_close(
        M.gaussian_nll(m[0], var[0], y), torch.nn.functional.gaussian_nll_loss(m[0], y, var[0], full=True)
    )
    # a shared (scalar) variance broadcasts
    torch.testing.assert_close(
        M.gaussian_nll(m, torch.tensor(0.5, dtype=torch.float64), y),
        M.gaussian_nll(m, torch.full_like(m, 0.5), y),
    )


def test_gaussian_mixture_nll_equals_torch_distributions_mixture():
    g = torch.Generator().manual_seed(16)
    means = torch.randn(5, 40, generator=g, dtype=torch.float64)
    var = torch.rand(5, 40, generator=g, dtype=torch.float64) + 0.05
    y = torch.randn(40, generator=g, dtype=torch.float64)
    w = torch.rand(5, generator=g, dtype=torch.float64)
    w = w / w.sum()
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=w), torch.distributions.Normal(means.T, var.T.sqrt())
    )
    torch.testing.assert_close(M.gaussian_mixture_nll(means, var, y, weights=w), -mix.log_prob(y).mean())
    # one component is the Gaussian NLL; equal weights by default
    torch.testing.assert_close(
        M.gaussian_mixture_nll(means[:1], var[:1], y), M.gaussian_nll(means[0], var[0], y)
    )
    torch.testing.assert_close(
        M.gaussian_mixture_nll(means, var, y),
        M.gaussian_mixture_nll(means, var, y, weights=torch.full((5,), 0.2, dtype=torch.float64)),
    )
    # batched: (S, B, N)
    stacked = torch.stack([means, means + 1])
    out = M.gaussian_mixture_nll(stacked.transpose(0, 1), torch.tensor(0.3, dtype=torch.float64), y)
    assert out.shape == (2,)
    torch.testing.assert_close(
        out[1], M.gaussian_mixture_nll(means + 1, torch.tensor(0.3, dtype=torch.float64), y)
    )


def test_crps_gaussian_equals_numerical_integration():
    # CRPS(F, y) = int_{-inf}^y F(t)^2 dt + int_y^inf (1 - F(t))^2 dt, trapezoid rule on each side of the
    # jump at y, over a range wide enough for the tails
    cases = [(0.0, 1.0, 0.0), (0.3, 0.5, 1.7), (-2.0, 3.0, 1.0), (1.0, 0.05, 0.9), (0.0, 2.0, -7.0)]
    for mu, sd, y in cases:
        normal = torch.distributions.Normal(
            torch.tensor(mu, dtype=torch.float64), torch.tensor(sd, dtype=torch.float64)
        )
        left = torch.linspace(min(mu, y) - 12 * sd, y, 200001, dtype=torch.float64)
        right = torch.linspace(y, max(mu, y) + 12 * sd, 200001, dtype=torch.float64)
        numeric = torch.trapezoid(normal.cdf(left).square(), left) + torch.trapezoid(
            (1 - normal.cdf(right)).square(), right
        )
        closed = M.crps_gaussian(
            torch.tensor([mu], dtype=torch.float64),
            torch.tensor([sd], dtype=torch.float64),
            torch.tensor([y], dtype=torch.float64),
        )
        assert float(closed) == pytest.approx(float(numeric), rel=1e-8, abs=1e-10), (mu, sd, y)


def test_crps_limits_and_deepuqs_formula_is_wrong():
    y = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    m = torch.zeros(3, dtype=torch.float64)
    # std -> 0: the absolute error
    assert float(M.crps_gaussian(m, torch.full((3,), 1e-8, dtype=torch.float64), y)) == pytest.approx(
        float((y - m).abs().mean()), rel=1e-6
    )
    # at y = mean: sd (sqrt(2) - 1) / sqrt(pi)
    assert float(M.crps_gaussian(m, torch.full((3,), 2.0, dtype=torch.float64), m)) == pytest.approx(
        2 * (math.sqrt(2) - 1) / math.sqrt(math.pi)
    )
    # deepuq: sd * (z (2 Phi(z) - 1) + phi(z) - 1/sqrt(pi)) misses the factor 2 on phi: negative at z = 0
    z, sd = 0.0, 1.0
    deepuq = sd * (z * (2 * 0.5 - 1) + math.exp(-z * z / 2) / math.sqrt(2 * math.pi) - 1 / math.sqrt(math.pi))
    assert deepuq < 0 < float(M.crps_gaussian(torch.zeros(1), torch.ones(1), torch.zeros(1)))


def test_picp_and_interval_width_of_a_calibrated_gaussian():
    g = torch.Generator().manual_seed(17)
    n = 20000
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    std = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    y = mean + std * torch.randn(n, generator=g, dtype=torch.float64)
    for level in (0.5, 0.9, 0.95):
        se = math.sqrt(level * (1 - level) / n)
        assert abs(float(M.picp(mean, std, y, level=level)) - level) < 4 * se
    assert float(M.interval_width(std, level=0.95)) == pytest.approx(
        2 * 1.959963984540054 * float(std.mean()), rel=1e-9
    )
    # hand-computed: |y - mean| = 0, 1, 1.5, 3 against z = 1.96
    assert float(M.picp(torch.zeros(4), torch.ones(4), torch.tensor([0.0, 1.0, -1.5, 3.0]))) == 0.75


def test_regression_calibration_error_small_when_calibrated_large_when_over_or_underconfident():
    g = torch.Generator().manual_seed(18)
    n = 20000
    mean = torch.randn(n, generator=g, dtype=torch.float64)
    y = mean + torch.randn(n, generator=g, dtype=torch.float64)
    ones = torch.ones(n, dtype=torch.float64)
    assert float(M.regression_calibration_error(mean, ones, y)) < 0.01
    assert float(M.regression_calibration_error(mean, 0.3 * ones, y)) > 0.15
    assert float(M.regression_calibration_error(mean, 3 * ones, y)) > 0.15
    # against a loop over levels
    levels = torch.arange(1, 11, dtype=torch.float64) / 11
    cdf = torch.distributions.Normal(mean, 0.5 * ones).cdf(y)
    expected = math.sqrt(sum((float((cdf <= p).double().mean()) - float(p)) ** 2 for p in levels) / 10)
    assert float(M.regression_calibration_error(mean, 0.5 * ones, y, num_levels=10)) == pytest.approx(
        expected, abs=1e-12
    )


def test_regression_metrics_batched():
    g = torch.Generator().manual_seed(19)
    mean, std = torch.randn(3, 25, generator=g), torch.rand(3, 25, generator=g) + 0.1
    y = torch.randn(25, generator=g)
    for fn, args in (
        (M.rmse, (mean, y)),
        (M.gaussian_nll, (mean, std**2, y)),
        (M.crps_gaussian, (mean, std, y)),
        (M.picp, (mean, std, y)),
        (M.regression_calibration_error, (mean, std, y)),
    ):
        out = fn(*args)
        assert out.shape == (3,)
        torch.testing.assert_close(
            out, torch.stack([fn(*(a[i] if a.dim() == 2 else a for a in args)) for i in range(3)])
        )


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: M.accuracy(torch.tensor([[0.5, 0.6]]), torch.tensor([0])), "sum to one"),
        (lambda: M.nll(torch.tensor([[2.0, -1.0]]), torch.tensor([0])), r"\[0, 1\].*logits"),
        (lambda: M.brier(torch.tensor([[0.5, 0.5]]), torch.tensor([2])), r"labels must lie in \[0, 2\)"),
        (lambda: M.brier(torch.tensor([[0.5, 0.5]]), torch.tensor([-1])), r"labels must lie in \[0, 2\)"),
        (lambda: M.ece(torch.tensor([[0.5, 0.5]] * 3), torch.tensor([0, 1])), "3 examples"),
        (lambda: M.ece(torch.tensor([[0.5, 0.5]]), torch.tensor([0]), num_bins=0), "num_bins"),
        (lambda: M.nll(torch.tensor([[float("nan"), 0.5]]), torch.tensor([0])), "finite"),
        (lambda: M.nll(torch.tensor([[1.0]]), torch.tensor([0])), "at least 2 classes"),
        (lambda: M.nll(torch.tensor([0.5, 0.5]), torch.tensor([0])), "at least 2 dimension"),
        (lambda: M.auroc(torch.rand(4), torch.tensor([1, 1, 1, 1])), "both classes"),
        (lambda: M.auroc(torch.rand(4), torch.tensor([0, 1, 2, 1])), r"\[0, 2\)"),
        (lambda: M.auroc(torch.rand(4), torch.tensor([0, 1, 0])), "4 examples"),
        (lambda: M.ood_auroc(torch.rand(2, 4), torch.rand(3, 4)), "batch axes"),
        (lambda: M.rmse(torch.zeros(3), torch.zeros(4)), "do not broadcast|same number of examples"),
        (
            lambda: M.gaussian_nll(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]), torch.zeros(3)),
            "var must be > 0",
        ),
        (lambda: M.crps_gaussian(torch.zeros(3), -torch.ones(3), torch.zeros(3)), "std must be > 0"),
        (lambda: M.picp(torch.zeros(3), torch.ones(3), torch.zeros(3), level=1.0), "level"),
        (
            lambda: M.gaussian_mixture_nll(
                torch.zeros(2, 3), torch.ones(1), torch.zeros(3), weights=torch.tensor([0.7, 0.7])
            ),
            "sum to one",
        ),
        (lambda: M.gaussian_mixture_nll(torch.zeros(2, 3), torch.ones(2, 2), torch.zeros(3)), "broadcast"),
        (lambda: M.aurc(torch.rand(3), torch.tensor([1.0, -1.0, 0.0])), "errors must be >= 0"),
        (lambda: M.rmse(torch.tensor([1.0, float("inf")]), torch.zeros(2)), "finite"),
    ],
)
def test_bad_inputs_raise_value_errors_that_say_what_is_wrong(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_wrong_types_raise_type_errors():
    with pytest.raises(TypeError, match="integer"):
        M.accuracy(torch.tensor([[0.5, 0.5]]), torch.tensor([0.0]))
    with pytest.raises(TypeError, match="floating-point"):
        M.accuracy(torch.tensor([[1, 0]]), torch.tensor([0]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        M.rmse([1.0, 2.0], torch.zeros(2))
