"""Run the evaluation: every chosen method on every chosen data set, then tables, claims and figures."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple, TextIO

import torch

from . import figures, report
from .datasets import DatasetUnavailable
from .methods import METHODS
from .protocol import SCALES
from .tasks import TASKS, Progress, TaskResult, fits_in

__all__ = ["Evaluation", "evaluate"]


class Evaluation(NamedTuple):
    """What :func:`evaluate` returns: results per task, the claims, skipped tasks, written files, seconds."""

    results: dict[str, TaskResult]
    claims: list[report.Claim]
    skipped: dict[str, str]
    files: list[Path]
    seconds: float
    markdown: str


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def _check_names(given: list[str] | None, known: list[str], what: str) -> list[str]:
    if given is None:
        return list(known)
    unknown = [n for n in given if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return [n for n in known if n in given]  # the tables' order


def evaluate(
    *,
    scale: str = "default",
    methods: list[str] | None = None,
    datasets: list[str] | None = None,
    out: str | Path = "funcbnn-eval",
    seed: int = 0,
    threads: int | None = 1,
    stream: TextIO | None = sys.stderr,
    figures_on: bool = True,
    readme: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Evaluation:
    """Run the evaluation and write ``results.md``, one CSV per task and the figures into ``out``.

    Parameters
    ----------
    scale : {"quick", "default", "full"}
        See :data:`funcbnn.evaluation.protocol.SCALES`.
    methods, datasets : list of str, optional
        Subsets of :data:`~funcbnn.evaluation.methods.METHODS` and
        :data:`~funcbnn.evaluation.tasks.TASKS` (default: all).
    out : path
        Output folder (created).
    seed : int
        Every split, initialisation, data order and weight draw follows from it:
        the same seed gives the same numbers (timings aside).
    threads : int, optional
        ``torch.set_num_threads`` for the run (default 1: the networks are
        small, and on a machine that other processes share a second intra-op
        thread made training several times slower in our measurements).
    stream : text stream, optional
        Progress lines (default stderr; ``None`` for silence).
    figures_on : bool
        Draw the PNG figures (when matplotlib is installed).
    device : str or torch.device, default "cpu"
        Where data, weights and weight draws live. Networks are initialised on
        the CPU and data orders come from CPU generators, so the same seed starts
        every device from the same weights; the numbers still differ by the
        devices' arithmetic and random streams.
    readme : path, optional
        A Markdown file whose block between :data:`funcbnn.evaluation.report.README_BEGIN`
        and ``README_END`` is replaced by the results (how the README's tables are made).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {list(SCALES)}, got {scale!r}")
    sc = SCALES[scale]
    device = torch.device(device)
    try:  # an unavailable device fails here, before any work
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"device {str(device)!r} is not available here: {err}") from None
    methods = _check_names(methods, list(METHODS), "methods")
    datasets = _check_names(datasets, list(TASKS), "datasets")
    if readme is not None:
        text = Path(readme).read_text()
        if report.README_BEGIN not in text or report.README_END not in text:
            raise ValueError(
                f"{readme} has no '{report.README_BEGIN}' ... '{report.README_END}' block to fill"
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    load_before = _load()
    start = time.perf_counter()
    progress = Progress(fits_in(datasets, sc, len(methods)), stream)
    results: dict[str, TaskResult] = {}
    skipped: dict[str, str] = {}
    try:
        for name in datasets:
            try:
                results[name] = TASKS[name](sc, methods, seed, progress, device)
            except DatasetUnavailable as err:
                skipped[name] = str(err)
                progress.say(f"skipped {name}: {err}")
    finally:
        torch.set_num_threads(previous_threads)
    seconds = time.perf_counter() - start
    claims = report.check_claims(results)
    files: list[Path] = []
    for name, res in results.items():
        report.write_csv(out / f"{name}.csv", res.rows)
        files.append(out / f"{name}.csv")
        if res.extra:
            report.write_csv(out / f"{name}_shift.csv", res.extra)
            files.append(out / f"{name}_shift.csv")
    figure_note = "figures not drawn (--no-figures)"
    if figures_on:
        drawn, figure_note = figures.draw_all(results, out)
        files += drawn
    info = {
        "scale": scale,
        "seed": seed,
        "threads": threads,
        "device": str(device),
        "seconds": seconds,
        "load_before": load_before,
        "load_after": _load(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    markdown = _markdown(
        results, claims, skipped, info, figure_note, [f for f in files if f.suffix == ".png"]
    )
    (out / "results.md").write_text(markdown)
    files.append(out / "results.md")
    if readme is not None:
        report.embed_in_readme(Path(readme), markdown, out)
    return Evaluation(results, claims, skipped, files, seconds, markdown)


TITLES = {
    "boston": "Boston housing (UCI protocol, original units)",
    "concrete": "Concrete compressive strength (UCI protocol, original units)",
    "diabetes": "Diabetes (scikit-learn; UCI protocol, original units)",
    "gap": "In-between gap regression (epistemic std in the gap vs at the training inputs)",
    "digits": "Digits 0-4 (few training images): in distribution, OOD = digits 5-9, shift = mean over strengths",
    "breast_cancer": "Breast cancer (binary, Bernoulli likelihood)",
}


def _markdown(results, claims, skipped, info, figure_note, pngs) -> str:
    lines = [
        "## Results",
        "",
        f"`python -m funcbnn` (scale {info['scale']}, seed {info['seed']}, {info['threads']} thread(s), "
        f"device {info['device']}): "
        f"{info['seconds']:.0f} s on {info['machine']}; load average {info['load_before']} before, "
        f"{info['load_after']} after. Cells are mean ± sd over splits.",
        "",
    ]
    for name, res in results.items():
        lines += [f"### {TITLES.get(name, name)}", ""]
        if res.note:
            lines += [f"> {res.note}", ""]
        header, body = report.table_rows(res)
        lines += [report.markdown_table(header, body), ""]
        if res.extra:
            for metric in ("nll", "ece"):
                h, b = report.shift_table(res.extra, metric)
                lines += [f"{metric.upper()} per shift:", "", report.markdown_table(h, b), ""]
        failed = {r["method"]: r["status"] for r in res.rows if r.get("status") != "ok"}
        for m, status in failed.items():
            lines.append(f"- {m} failed: {status}")
        if failed:
            lines.append("")
    for name, why in skipped.items():
        lines += [f"- {name} skipped: {why}"]
    if skipped:
        lines.append("")
    lines += ["### What the results must show", ""]
    for c in claims:
        mark = {True: "PASS", False: "MISS", None: "n/a"}[c.ok]
        lines.append(f"- **{mark}** {c.text}: {c.detail}")
    lines.append("")
    if pngs:
        lines += ["### Figures", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    elif figure_note:
        lines += [figure_note, ""]
    return "\n".join(lines)


def print_summary(ev: Evaluation, out: TextIO = sys.stdout) -> None:
    """The tables and claims as plain text."""
    for name, res in ev.results.items():
        out.write(f"\n== {TITLES.get(name, name)} ==\n")
        if res.note:
            out.write(f"NOTE: {res.note}\n")
        header, body = report.table_rows(res)
        out.write(report.text_table(header, body) + "\n")
        for r in res.rows:
            if r.get("status") != "ok":
                out.write(f"  {r['method']} (split {r.get('split')}) failed: {r['status']}\n")
    for name, why in ev.skipped.items():
        out.write(f"\n{name} skipped: {why}\n")
    out.write("\n== What the results must show ==\n")
    for c in ev.claims:
        mark = {True: "PASS", False: "MISS", None: "n/a "}[c.ok]
        out.write(f"[{mark}] {c.text}: {c.detail}\n")
    out.flush()
