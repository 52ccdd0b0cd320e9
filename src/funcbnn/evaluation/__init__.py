"""The evaluation behind ``python -m funcbnn``: every method on real data, against published numbers.

One concept per module: :mod:`~funcbnn.evaluation.datasets` (loading and
splitting, no downloads), :mod:`~funcbnn.evaluation.methods` (each method as a
fit function on funcbnn's public API), :mod:`~funcbnn.evaluation.protocol`
(the quick / default / full scales and network recipes),
:mod:`~funcbnn.evaluation.tasks` (fit and score per task),
:mod:`~funcbnn.evaluation.published` (the papers' numbers),
:mod:`~funcbnn.evaluation.report` (tables and the claims),
:mod:`~funcbnn.evaluation.figures` (PNGs) and
:mod:`~funcbnn.evaluation.runner` (:func:`evaluate`).
"""

from .runner import Evaluation, evaluate, print_summary

__all__ = ["Evaluation", "evaluate", "print_summary"]
