"""Tables (printed, CSV, Markdown) and the checks of what the results must show.

Cells are ``mean ± sd`` over splits (sd with Bessel's correction; blank for one
split). Published rows are printed beneath ours with their own ``±`` as the
papers give it. Every claim of the issue is checked and printed as PASS or
MISS with the numbers behind it: a miss is a result, not a failure of the run.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, NamedTuple

from .methods import is_bayesian
from .published import PUBLISHED
from .tasks import TaskResult

__all__ = [
    "COLUMNS",
    "Claim",
    "aggregate",
    "check_claims",
    "markdown_table",
    "text_table",
    "write_csv",
    "embed_in_readme",
]

README_BEGIN = "<!-- python -m funcbnn --readme: begin -->"
README_END = "<!-- python -m funcbnn --readme: end -->"

COLUMNS = {
    "regression": ["rmse", "nll", "crps", "picp95", "width95", "calib", "time_s"],
    "gap": ["gap_std", "near_std", "ratio", "rmse", "nll", "time_s"],
    "digits": [
        "acc",
        "nll",
        "ece",
        "aece",
        "brier",
        "aurc",
        "ood_auroc",
        "ood_aupr",
        "shift_nll",
        "shift_ece",
        "time_s",
    ],
    "breast_cancer": ["acc", "nll", "ece", "aece", "brier", "aurc", "time_s"],
}
"""The columns of each task's table."""

HEADERS = {
    "rmse": "RMSE ↓",
    "nll": "NLL ↓",
    "crps": "CRPS ↓",
    "picp95": "PICP95 (→0.95)",
    "width95": "width95",
    "calib": "calib ↓",
    "time_s": "time (s)",
    "gap_std": "std in gap",
    "near_std": "std at data",
    "ratio": "gap / data ↑",
    "acc": "acc ↑",
    "ece": "ECE ↓",
    "aece": "adaptive ECE ↓",
    "brier": "Brier ↓",
    "aurc": "AURC ↓",
    "ood_auroc": "OOD AUROC ↑",
    "ood_aupr": "OOD AUPR ↑",
    "shift_nll": "shift NLL ↓",
    "shift_ece": "shift ECE ↓",
}


def columns_of(task: str) -> list[str]:
    """The columns of ``task``'s table (the regression columns for the regression data sets)."""
    return COLUMNS.get(task, COLUMNS["regression"])


def aggregate(
    rows: list[dict[str, Any]], columns: list[str]
) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{method: {column: (mean, sd, n)}}`` over the rows whose status is ok, in first-seen method order."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        ok = [r for r in rows if r["method"] == m and r.get("status") == "ok"]
        stats = {}
        for c in columns:
            vals = [float(r[c]) for r in ok if c in r]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            sd = (
                math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                if len(vals) > 1
                else float("nan")
            )
            stats[c] = (mean, sd, len(vals))
        out[m] = stats
    return out


def _cell(stat: tuple[float, float, int] | None, digits: int = 3) -> str:
    if stat is None:
        return "-"
    mean, sd, _ = stat
    if math.isnan(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _failures(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {r["method"]: r["status"] for r in rows if r.get("status") != "ok"}


def table_rows(result: TaskResult) -> tuple[list[str], list[list[str]]]:
    """Header and body of a task's table (ours, then any published rows)."""
    cols = columns_of(result.name)
    agg = aggregate(result.rows, cols)
    header = ["method", *[HEADERS.get(c, c) for c in cols]]
    body = []
    failed = _failures(result.rows)
    for m, stats in agg.items():
        if not stats:
            body.append([m, *(["failed"] + ["-"] * (len(cols) - 1))])
            continue
        digits = {c: (1 if c == "time_s" else 3) for c in cols}
        name = m + (" (some splits failed)" if m in failed else "")
        body.append([name, *[_cell(stats.get(c), digits[c]) for c in cols]])
    for pub in PUBLISHED.get(result.name, []):
        cells = []
        for c in cols:
            val = {"rmse": pub.rmse, "nll": pub.nll}.get(c)
            cells.append(f"{val[0]:.2f} ± {val[1]:.2f}" if val else "")
        body.append([f"published {pub.method} ({pub.source})", *cells])
    return header, body


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def text_table(header: list[str], body: list[list[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths))
        )

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *[fmt(r) for r in body]])


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """All rows with the union of their keys as columns (first-seen order)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def shift_table(extra: list[dict[str, Any]], metric: str) -> tuple[list[str], list[list[str]]]:
    """Method x (shift, strength) table of one metric, averaged over splits."""
    keys = list(dict.fromkeys((r["shift"], r["strength"]) for r in extra))
    methods = list(dict.fromkeys(r["method"] for r in extra))
    header = ["method", *[f"{k} {s:g}" for k, s in keys]]
    body = []
    for m in methods:
        cells = []
        for k, s in keys:
            vals = [r[metric] for r in extra if r["method"] == m and r["shift"] == k and r["strength"] == s]
            cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "-")
        body.append([m, *cells])
    return header, body


# --- the claims ---------------------------------------------------------------------------------


class Claim(NamedTuple):
    """One statement the results must show: ``ok`` is True (PASS), False (MISS) or None (not run)."""

    text: str
    ok: bool | None
    detail: str


def _mean(agg: dict, method: str, col: str) -> float | None:
    stat = agg.get(method, {}).get(col)
    return None if stat is None else stat[0]


def _uci_claims(results: dict[str, TaskResult]) -> list[Claim]:
    claims = []
    for ds in ("boston", "concrete"):
        if ds not in results:
            continue
        agg = aggregate(results[ds].rows, COLUMNS["regression"])
        for pub in PUBLISHED[ds]:
            ours = {c: _mean(agg, pub.method, c) for c in ("rmse", "nll")}
            if None in ours.values():
                claims.append(
                    Claim(f"{ds}: {pub.method} within the published mean ± sd", None, "method not run")
                )
                continue
            parts, ok = [], True
            for c, (m, s) in (("rmse", pub.rmse), ("nll", pub.nll)):
                inside = abs(ours[c] - m) <= s
                ok &= inside
                parts.append(
                    f"{c.upper()} {ours[c]:.2f} vs {m:.2f} ± {s:.2f} ({'inside' if inside else 'outside'})"
                )
            claims.append(
                Claim(
                    f"{ds}: {pub.method} within the published mean ± sd (RMSE and NLL)", ok, "; ".join(parts)
                )
            )
    for ds in ("boston", "concrete", "diabetes"):
        if ds not in results:
            continue
        agg = aggregate(results[ds].rows, ["nll"])
        base = _mean(agg, "map", "nll")
        if base is None:
            continue
        others = {m: _mean(agg, m, "nll") for m in agg if is_bayesian(m) and _mean(agg, m, "nll") is not None}
        misses = {m: v for m, v in others.items() if not v < base}
        detail = f"MAP {base:.3f}; " + (
            "misses: " + ", ".join(f"{m} {v:.3f}" for m, v in misses.items()) if misses else "all lower"
        )
        claims.append(Claim(f"{ds}: every Bayesian method's NLL beats the MAP's", not misses, detail))
    return claims


def _digits_claims(result: TaskResult) -> list[Claim]:
    agg = aggregate(result.rows, COLUMNS["digits"])
    if "map" not in agg or not agg["map"]:
        return [Claim("digits: comparisons with the MAP", None, "MAP not run")]
    acc0, nll0, auroc0 = (_mean(agg, "map", c) for c in ("acc", "nll", "ood_auroc"))
    bayes = [m for m in agg if is_bayesian(m) and agg[m]]
    claims = []
    miss = [f"{m} {_mean(agg, m, 'acc'):.3f}" for m in bayes if _mean(agg, m, "acc") < acc0 - 0.01]
    claims.append(
        Claim(
            "digits: every Bayesian method keeps the MAP's accuracy within one point",
            not miss,
            f"MAP {acc0:.3f}; " + ("misses: " + ", ".join(miss) if miss else "all within"),
        )
    )
    miss = [f"{m} {_mean(agg, m, 'nll'):.3f}" for m in bayes if _mean(agg, m, "nll") > 1.2 * nll0]
    claims.append(
        Claim(
            "digits: every Bayesian method's in-distribution NLL is within 1.2x the MAP's",
            not miss,
            f"MAP {nll0:.3f} (bound {1.2 * nll0:.3f}); "
            + ("misses: " + ", ".join(miss) if miss else "all within"),
        )
    )
    # under every shift strength, averaged over splits
    cells: dict[tuple[str, str, float], dict[str, float]] = {}
    for r in result.extra:
        key = (r["method"], r["shift"], r["strength"])
        acc = cells.setdefault(key, {"nll": 0.0, "ece": 0.0, "n": 0})
        acc["nll"] += r["nll"]
        acc["ece"] += r["ece"]
        acc["n"] += 1
    for metric in ("nll", "ece"):
        miss = []
        for (m, kind, s), v in cells.items():
            if m not in bayes:
                continue
            base = cells.get(("map", kind, s))
            if base and not v[metric] / v["n"] < base[metric] / base["n"]:
                miss.append(f"{m} at {kind} {s:g}")
        claims.append(
            Claim(
                f"digits: every Bayesian method lowers the MAP's {metric.upper()} under every shift strength",
                not miss,
                ("misses (" + str(len(miss)) + "): " + ", ".join(miss)) if miss else "all lower",
            )
        )
    best = max(bayes, key=lambda m: _mean(agg, m, "ood_auroc"), default=None)
    if best is not None:
        v = _mean(agg, best, "ood_auroc")
        claims.append(
            Claim(
                "digits: the best OOD AUROC beats the MAP's",
                v > auroc0,
                f"best {best} {v:.3f} vs MAP {auroc0:.3f}",
            )
        )
    return claims


GAP_METHODS = (
    "laplace_kron_ll",
    "laplace_diag",
    "laplace_val",
    "laplace_marglik",
    "ensemble",
    "swag",
    "multiswag",
    "bbb",
    "bbb_map",
)
"""Methods of which the gap claim asks an epistemic std in the gap at least twice that at the data."""


def _gap_claims(result: TaskResult) -> list[Claim]:
    agg = aggregate(result.rows, ["ratio"])
    ratios = {m: _mean(agg, m, "ratio") for m in GAP_METHODS if _mean(agg, m, "ratio") is not None}
    if not ratios:
        return []
    miss = {m: r for m, r in ratios.items() if not r >= 2}
    detail = ", ".join(f"{m} {r:.1f}x" for m, r in ratios.items())
    text = "gap: epistemic std in the gap at least twice that at the data (Laplace, ensembles, SWAG, VI)"
    if miss:
        detail += "; misses: " + ", ".join(miss)
        if any(m.startswith("bbb") for m in miss):
            detail += " (mean-field VI is known to miss the in-between gap: Foong et al. 2019)"
    return [Claim(text, not miss, detail)]


def check_claims(results: dict[str, TaskResult]) -> list[Claim]:
    """Every claim that the tasks in ``results`` allow checking."""
    claims = _uci_claims(results)
    if "digits" in results:
        claims += _digits_claims(results["digits"])
    if "gap" in results:
        claims += _gap_claims(results["gap"])
    return claims


def embed_in_readme(readme: Path, markdown: str, out: Path) -> None:
    """Replace the text between :data:`README_BEGIN` and :data:`README_END` in ``readme`` with ``markdown``.

    Headings move one level down (the results sit inside the README's
    "Evaluation" section) and figures become links relative to the README
    (not embedded images: the output folder is not part of the repository, so
    an image would show as broken until the command has been run).

    Raises
    ------
    ValueError
        If ``readme`` lacks either marker.
    """
    import os

    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no '{README_BEGIN}' ... '{README_END}' block to fill")
    rel = Path(os.path.relpath(out.resolve(), readme.resolve().parent))
    lines = []
    for line in markdown.splitlines():
        if line.startswith("#"):
            line = "#" + line
            if line.endswith("Figures"):
                line += " (written into the output folder by the run)"
        if line.startswith("![") and line.endswith(".png)"):
            label, name = line[2:-1].split("](")
            line = f"- [{label}]({(rel / name).as_posix()})"
        lines.append(line)
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_BEGIN + "\n" + "\n".join(lines).strip() + "\n" + README_END + tail)
