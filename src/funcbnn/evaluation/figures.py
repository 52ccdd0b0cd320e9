"""PNG figures of a run (matplotlib, Agg backend): skipped with a message when matplotlib is missing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["draw_all"]


def _grid(plt: Any, n: int, width: float = 3.0, height: float = 2.6):
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _reliability(plt: Any, data: dict[str, Any], path: Path) -> None:
    fig, axes = _grid(plt, len(data))
    for ax, (method, r) in zip(axes, data.items()):
        edges = r.edges.tolist()
        width = edges[1] - edges[0]
        nonempty = (r.counts > 0).tolist()
        acc = [a if ne else 0.0 for a, ne in zip(r.accuracy.tolist(), nonempty)]
        conf = [c if ne else 0.0 for c, ne in zip(r.confidence.tolist(), nonempty)]
        ax.bar(edges[:-1], acc, width=width, align="edge", color="tab:blue", alpha=0.8, label="accuracy")
        ax.bar(
            edges[:-1],
            [c - a for c, a in zip(conf, acc)],
            bottom=acc,
            width=width,
            align="edge",
            color="tab:red",
            alpha=0.3,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_title(f"{method}\nECE {float(r.ece):.3f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("digits 0-4, in distribution: reliability (15 bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _entropy(plt: Any, data: dict[str, Any], path: Path) -> None:
    fig, axes = _grid(plt, len(data))
    top = math.log(5)
    for ax, (method, (h_in, h_out)) in zip(axes, data.items()):
        bins = [top * i / 30 for i in range(31)]
        ax.hist(h_in.tolist(), bins=bins, alpha=0.6, density=True, label="test 0-4")
        ax.hist(h_out.tolist(), bins=bins, alpha=0.6, density=True, label="OOD 5-9")
        ax.set_title(method, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle("digits: predictive entropy in vs out of distribution (nats)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shift(plt: Any, extra: list[dict[str, Any]], path: Path) -> None:
    kinds = list(dict.fromkeys(r["shift"] for r in extra))
    methods = list(dict.fromkeys(r["method"] for r in extra))
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 7), squeeze=False)
    for j, kind in enumerate(kinds):
        for i, metric in enumerate(("nll", "ece")):
            ax = axes[i][j]
            for m in methods:
                strengths = sorted({r["strength"] for r in extra if r["shift"] == kind and r["method"] == m})
                vals = []
                for s in strengths:
                    v = [
                        r[metric]
                        for r in extra
                        if r["shift"] == kind and r["method"] == m and r["strength"] == s
                    ]
                    vals.append(sum(v) / len(v))
                style = {"color": "k", "lw": 2.2} if m == "map" else {"lw": 1.2}
                ax.plot(strengths, vals, marker="o", ms=3, label=m, **style)
            ax.set_xlabel("pixel-noise std" if kind == "noise" else "rotation (degrees)")
            ax.set_ylabel(metric.upper())
            ax.set_title(f"{metric.upper()} under {kind}", fontsize=10)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle("digits: metrics vs shift strength (MAP in black)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _gap(plt: Any, data: dict[str, Any], path: Path) -> None:
    curves = data["curves"]
    fig, axes = _grid(plt, len(curves), width=3.2, height=2.6)
    x_tr, y_tr = data["train"]
    lo, hi = data["interval"]
    for ax, (method, c) in zip(axes, curves.items()):
        x, mean = c["x"].tolist(), c["mean"]
        tot, epi = c["total_std"], c["epistemic_std"]
        ax.axvspan(lo, hi, color="0.93")
        ax.fill_between(
            x, (mean - 2 * tot).tolist(), (mean + 2 * tot).tolist(), color="tab:blue", alpha=0.15, lw=0
        )
        ax.fill_between(
            x, (mean - 2 * epi).tolist(), (mean + 2 * epi).tolist(), color="tab:blue", alpha=0.35, lw=0
        )
        ax.plot(x, mean.tolist(), color="tab:blue", lw=1)
        ax.scatter(x_tr.tolist(), y_tr.tolist(), s=4, color="k", zorder=3)
        ax.set_ylim(-3, 3)
        ax.set_title(method, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("in-between gap: mean, ±2 epistemic std (dark), ±2 total std (light); gap shaded")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_all(results: dict[str, Any], out: Path) -> tuple[list[Path], str]:
    """Draw every figure the results allow into ``out``; returns the files and a message (why some were skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "figures skipped: matplotlib is not installed (pip install 'funcbnn[demo]')"
    written = []
    digits = results.get("digits")
    if digits is not None and digits.figures.get("reliability"):
        for name, draw, key in (
            ("reliability_digits.png", _reliability, "reliability"),
            ("entropy_digits.png", _entropy, "entropy"),
        ):
            draw(plt, digits.figures[key], out / name)
            written.append(out / name)
        if digits.extra:
            _shift(plt, digits.extra, out / "shift_digits.png")
            written.append(out / "shift_digits.png")
    gap = results.get("gap")
    if gap is not None and gap.figures.get("gap", {}).get("curves"):
        _gap(plt, gap.figures["gap"], out / "gap.png")
        written.append(out / "gap.png")
    return written, ""
