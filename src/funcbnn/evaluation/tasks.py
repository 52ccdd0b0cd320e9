"""The tasks: fit every method on each split and score its predictive on held-out data.

Each ``run_*`` function returns a :class:`TaskResult`: one row of metrics per
(split, method) plus what the figures need. Methods that fail are recorded
with the error instead of stopping the run.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from .. import metrics
from . import datasets
from .datasets import Split
from .methods import METHODS, Context, Prediction, Problem
from .protocol import Scale, recipe_for

__all__ = ["TaskResult", "Progress", "run_regression", "run_gap", "run_digits", "run_cancer", "TASKS"]


class TaskResult(NamedTuple):
    """Rows of metrics (one dict per split and method), extra long-format rows, and data for the figures."""

    name: str
    rows: list[dict[str, Any]]
    extra: list[dict[str, Any]]
    figures: dict[str, Any]
    note: str = ""


class Progress:
    """One line per fitted method on a stream (stderr): count, elapsed time, what ran and how long it took."""

    def __init__(self, total: int, stream: Any) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.start = time.perf_counter()

    def step(self, text: str, seconds: float) -> None:
        self.done += 1
        if self.stream is None:
            return
        elapsed = time.perf_counter() - self.start
        width = len(str(self.total))
        self.stream.write(
            f"[{self.done:>{width}}/{self.total} {int(elapsed) // 60}m{int(elapsed) % 60:02d}s] {text} ({seconds:.1f} s)\n"
        )
        self.stream.flush()

    def say(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()


def _fit_all(
    problem: Problem,
    seed: int,
    methods: list[str],
    label: str,
    progress: Progress,
    score: Callable[[str, Callable], dict],
) -> list[dict[str, Any]]:
    ctx = Context(problem, seed)
    rows = []
    for name in methods:
        start = time.perf_counter()
        try:
            predictor = METHODS[name](ctx)
            row = score(name, predictor)
            row["status"] = "ok"
        except Exception as err:  # a failing method is a result too; the run goes on
            row = {"status": f"error: {type(err).__name__}: {err}"}
        seconds = time.perf_counter() - start
        rows.append({"method": name, **row, "time_s": seconds})
        progress.step(f"{label}: {name}" + ("" if row["status"] == "ok" else " FAILED"), seconds)
    return rows


# --- regression ---------------------------------------------------------------------------------


def _regression_metrics(pred: Prediction, split: Split, y: Tensor) -> dict[str, float]:
    """Metrics in the targets' original units (``y`` standardised, ``split.y_scale`` undoes it)."""
    a, b = split.y_scale, split.y_shift
    y0 = y.reshape(-1) * a + b
    mean = pred.mean * a + b
    std = pred.total_var.sqrt() * a
    if pred.component_means is not None:
        nll = metrics.gaussian_mixture_nll(pred.component_means * a + b, pred.component_vars * a**2, y0)
    else:
        nll = metrics.gaussian_nll(mean, std**2, y0)
    return {
        "rmse": float(metrics.rmse(mean, y0)),
        "nll": float(nll),
        "crps": float(metrics.crps_gaussian(mean, std, y0)),
        "picp95": float(metrics.picp(mean, std, y0, level=0.95)),
        "width95": float(metrics.interval_width(std, level=0.95)),
        "calib": float(metrics.regression_calibration_error(mean, std, y0)),
    }


def _on(split: Split, device: torch.device) -> Split:
    return Split(*(t.to(device) if isinstance(t, Tensor) else t for t in split))


def run_regression(
    name: str, scale: Scale, methods: list[str], seed: int, progress: Progress, device: torch.device
) -> TaskResult:
    """UCI-style regression on ``name``: ``scale.uci_splits`` (or ``diabetes_splits``) random 90/10 splits."""
    x, y = datasets.load_regression(name)
    splits = scale.diabetes_splits if name == "diabetes" else scale.uci_splits
    rows = []
    for i in range(splits):
        split = _on(datasets.regression_split(x, y, seed * 1000 + i), device)
        problem = Problem("regression", split, 1, recipe_for("uci", scale), device)

        def score(method: str, predictor: Callable) -> dict:
            return _regression_metrics(predictor(split.x_test), split, split.y_test)

        for row in _fit_all(
            problem, seed * 1000 + i, methods, f"{name} split {i + 1}/{splits}", progress, score
        ):
            rows.append({"task": name, "split": i, **row})
    note = datasets.BOSTON_CAVEAT if name == "boston" else ""
    return TaskResult(name, rows, [], {}, note)


# --- the in-between gap ---------------------------------------------------------------------------


def run_gap(
    scale: Scale, methods: list[str], seed: int, progress: Progress, device: torch.device
) -> TaskResult:
    """Gap regression: the epistemic std in the gap against that at the training inputs, and bands for the figure."""
    lo, hi = datasets.GAP_INTERVAL
    grid = torch.linspace(-1.5, 1.5, 301, device=device).unsqueeze(-1)
    in_gap = (grid[:, 0] >= lo) & (grid[:, 0] <= hi)
    rows, curves = [], {}
    for i in range(scale.gap_seeds):
        split = _on(datasets.gap_split(80, seed * 1000 + i), device)
        problem = Problem("regression", split, 1, recipe_for("gap", scale), device)

        def score(method: str, predictor: Callable) -> dict:
            on_grid, at_data = predictor(grid), predictor(split.x_train)
            gap_std = float(on_grid.epistemic_var[in_gap].sqrt().mean())
            near_std = float(at_data.epistemic_var.sqrt().mean())
            if i == 0:
                curves[method] = {
                    "x": grid[:, 0],
                    "mean": on_grid.mean,
                    "epistemic_std": on_grid.epistemic_var.sqrt(),
                    "total_std": on_grid.total_var.sqrt(),
                }
            return {
                "gap_std": gap_std,
                "near_std": near_std,
                "ratio": gap_std / max(near_std, 1e-12),
                **_regression_metrics(predictor(split.x_test), split, split.y_test),
            }

        for row in _fit_all(
            problem, seed * 1000 + i, methods, f"gap seed {i + 1}/{scale.gap_seeds}", progress, score
        ):
            rows.append({"task": "gap", "split": i, **row})
    figures = {
        "gap": {"curves": curves, "train": (split.x_train[:, 0], split.y_train[:, 0]), "interval": (lo, hi)}
    }
    return TaskResult("gap", rows, [], figures)


# --- classification -----------------------------------------------------------------------------


def _entropy(probs: Tensor) -> Tensor:
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def _class_metrics(probs: Tensor, y: Tensor) -> dict[str, float]:
    conf, pred = probs.max(-1)
    return {
        "acc": float(metrics.accuracy(probs, y)),
        "nll": float(metrics.nll(probs, y)),
        "ece": float(metrics.ece(probs, y)),
        "aece": float(metrics.adaptive_ece(probs, y)),
        "brier": float(metrics.brier(probs, y)),
        "aurc": float(metrics.aurc(conf, pred != y)),
    }


def _normalised(probs: Tensor) -> Tensor:
    """Probabilities renormalised in float64 (a GLM predictive's rows sum to one only up to float32 rounding)."""
    p = probs.double().clamp_min(0)
    return p / p.sum(-1, keepdim=True)


def run_digits(
    scale: Scale, methods: list[str], seed: int, progress: Progress, device: torch.device
) -> TaskResult:
    """Digits 0-4 (a few hundred training images): in distribution, under shift, and 5-9 as OOD."""
    rows, extra = [], []
    figures: dict[str, Any] = {"reliability": {}, "entropy": {}, "shift": []}
    for i in range(scale.digits_splits):
        ds = datasets.digits_split(scale.digits_train, seed * 1000 + i)
        g = torch.Generator().manual_seed(seed * 1000 + i + 7)
        shifted = [  # corrupted on the CPU (one generator stream whatever the device), then moved
            (kind, s, datasets.shift_images(ds.split.x_test, kind, s, g).to(device))
            for kind, strengths in (("noise", scale.shift_noise), ("rotation", scale.shift_rotation))
            for s in strengths
        ]
        split, x_ood = _on(ds.split, device), ds.x_ood.to(device)
        problem = Problem("classification", split, 5, recipe_for("digits", scale), device)

        def score(method: str, predictor: Callable) -> dict:
            p_test = _normalised(predictor(split.x_test).probs)
            p_ood = _normalised(predictor(x_ood).probs)
            row = _class_metrics(p_test, split.y_test)
            h_in, h_out = _entropy(p_test), _entropy(p_ood)
            row["ood_auroc"] = float(metrics.ood_auroc(h_in, h_out))
            row["ood_aupr"] = float(metrics.ood_aupr(h_in, h_out))
            shift_nll, shift_ece = [], []
            for kind, strength, xs in shifted:
                ps = _normalised(predictor(xs).probs)
                m = _class_metrics(ps, split.y_test)
                extra.append(
                    {"task": "digits", "split": i, "method": method, "shift": kind, "strength": strength, **m}
                )
                shift_nll.append(m["nll"])
                shift_ece.append(m["ece"])
            row["shift_nll"] = sum(shift_nll) / len(shift_nll)
            row["shift_ece"] = sum(shift_ece) / len(shift_ece)
            if i == 0:
                figures["reliability"][method] = metrics.reliability(p_test, split.y_test)
                figures["entropy"][method] = (h_in, h_out)
            return row

        for row in _fit_all(
            problem, seed * 1000 + i, methods, f"digits split {i + 1}/{scale.digits_splits}", progress, score
        ):
            rows.append({"task": "digits", "split": i, **row})
    # the shift rows of failed methods are absent; the figure reads the long rows
    figures["shift"] = extra
    return TaskResult("digits", rows, extra, figures)


def run_cancer(
    scale: Scale, methods: list[str], seed: int, progress: Progress, device: torch.device
) -> TaskResult:
    """Breast cancer, binary (Bernoulli likelihood): random 80/10/10 splits."""
    rows = []
    for i in range(scale.cancer_splits):
        split = _on(datasets.breast_cancer_split(seed * 1000 + i), device)
        problem = Problem("binary", split, 1, recipe_for("cancer", scale), device)

        def score(method: str, predictor: Callable) -> dict:
            return _class_metrics(_normalised(predictor(split.x_test).probs), split.y_test.reshape(-1).long())

        for row in _fit_all(
            problem,
            seed * 1000 + i,
            methods,
            f"breast cancer split {i + 1}/{scale.cancer_splits}",
            progress,
            score,
        ):
            rows.append({"task": "breast_cancer", "split": i, **row})
    return TaskResult("breast_cancer", rows, [], {})


def _count(name: str, scale: Scale) -> int:
    return {
        "boston": scale.uci_splits,
        "concrete": scale.uci_splits,
        "diabetes": scale.diabetes_splits,
        "gap": scale.gap_seeds,
        "digits": scale.digits_splits,
        "breast_cancer": scale.cancer_splits,
    }[name]


TASKS: dict[str, Callable[..., TaskResult]] = {
    "boston": functools.partial(run_regression, "boston"),
    "concrete": functools.partial(run_regression, "concrete"),
    "diabetes": functools.partial(run_regression, "diabetes"),
    "gap": run_gap,
    "digits": run_digits,
    "breast_cancer": run_cancer,
}
"""Every data set the evaluation knows, in the order it runs them: ``(scale, methods, seed, progress, device)``."""


def fits_in(names: list[str], scale: Scale, num_methods: int) -> int:
    """How many method fits a run of ``names`` at ``scale`` makes (for the progress display)."""
    return sum(_count(n, scale) for n in names) * num_methods
