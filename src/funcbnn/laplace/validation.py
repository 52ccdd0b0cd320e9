"""Hyperparameters chosen by the validation NLL of the linearised predictive, next to the marginal likelihood.

The marginal likelihood (:mod:`funcbnn.laplace.marglik`) needs no held-out
data but trusts the model; on an overfit MAP it picks a prior precision that
matches the MAP's large weight norm and gives an underconfident predictive.
The alternative of Ritter et al. (2018) and laplace-torch's
``optimize_prior_precision(method="gridsearch")`` is to pick the prior
precision (here also the temperature) that minimises the negative log
likelihood of held-out data under the posterior predictive.

Every candidate value reuses one :class:`~funcbnn.laplace.predictive.Linearization`
of the validation inputs (their outputs and Jacobian pieces at the MAP do not
depend on the hyperparameters), so a grid of ``G`` candidates costs one
linearisation plus ``G`` cheap weighings, and a gradient search differentiates
the predictive through the same pieces. The NLL is the proper one for the
likelihood: ``-log p(y)`` under the classification predictive, the Gaussian
``N(f, var_f + sigma^2)`` for regression (laplace-torch's grid search scores
regression by MSE, which the prior precision does not change).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, NamedTuple

import torch
from torch import Tensor

from .._validation import positive_float, positive_int
from ..likelihoods import Likelihood
from ._subset import Subset
from .curvature import check_data
from .marglik import initial_prior_precision
from .predictive import Linearization, linearize, predict
from .state import LaplaceState, as_temperature, hyperparameters

__all__ = ["ValidationInfo", "validation_nll", "tune_validation", "default_grid"]


class ValidationInfo(NamedTuple):
    """Diagnostics of :func:`tune_validation`.

    Attributes
    ----------
    nll : Tensor
        0-d: the mean validation NLL at the chosen hyperparameters.
    prior_precisions : Tensor
        The grid of prior precisions searched (``(G,)``), or the path of the
        gradient search (``(steps + 1, ...)``).
    temperatures : Tensor
        The temperature grid (``(G_T,)``; the state's temperature alone when it
        was not tuned), or the gradient search's path.
    table : Tensor
        The mean validation NLL per candidate: ``(G, G_T)`` for the grid, the
        objective per step ``(steps + 1,)`` for the gradient search.
    """

    nll: Tensor
    prior_precisions: Tensor
    temperatures: Tensor
    table: Tensor


def default_grid(ref: Tensor, size: int = 41) -> Tensor:
    """``logspace(-4, 4, size)``: laplace-torch's prior-precision grid range, at 4 points per decade by default."""
    return torch.logspace(-4, 4, positive_int(size, "size"), dtype=ref.dtype, device=ref.device)


def _nll(lik: Likelihood, out: Any, y: Tensor, sd: Tensor) -> Tensor:
    """Summed NLL of ``y`` under a predictive returned by :func:`~funcbnn.laplace.predictive.predict`."""
    if lik.is_classification:
        probs = out
        if lik.link == "sigmoid":
            p = probs.reshape(y.shape).clamp(1e-12, 1 - 1e-12)
            return -(y * p.log() + (1 - y) * (1 - p).log()).sum()
        return -probs.gather(-1, y.reshape(-1, 1)).clamp_min(1e-12).log().sum()
    mean, var = out
    return 0.5 * ((y - mean).square() / var + var.log() + math.log(2 * math.pi)).sum()


def validation_nll(
    apply_fn: Callable,
    subset: Subset,
    lik: Likelihood,
    state: LaplaceState,
    batches: list[tuple[Linearization, Tensor]],
    *,
    prior_precision: Any = None,
    sigma: Any = None,
    temperature: Any = None,
    link_approx: str = "probit",
    num_samples: int = 100,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean NLL of linearised validation batches ``[(Linearization, y), ...]`` at these hyperparameters.

    Differentiable in tensor hyperparameters (except ``link_approx="mc"``, whose
    draws are not reparameterised).
    """
    total, count = 0, 0
    _, sd, _ = hyperparameters(state, None, sigma)
    for lin, y in batches:
        out = predict(
            apply_fn, subset, lik, state, lin, prior_precision=prior_precision, sigma=sigma,
            temperature=temperature, link_approx=link_approx, num_samples=num_samples, generator=generator,
        )
        total = total + _nll(lik, out, y, sd)
        count += y.shape[0]
    return total / count


def tune_validation(
    apply_fn: Callable,
    subset: Subset,
    lik: Likelihood,
    state: LaplaceState,
    val_data: Any,
    *,
    method: Literal["grid", "gradient"] = "grid",
    grid: Tensor | None = None,
    temperatures: Tensor | None = None,
    tune_temperature: bool = False,
    prior_structure: str = "scalar",
    steps: int = 100,
    lr: float = 0.1,
    link_approx: str = "probit",
    num_samples: int = 100,
    generator: torch.Generator | None = None,
    chunk_size: int = 64,
) -> tuple[LaplaceState, ValidationInfo]:
    """Prior precision (and temperature) minimising the validation NLL of the linearised predictive.

    Parameters
    ----------
    apply_fn, subset, lik, state
        As bound by :func:`funcbnn.laplace.fit` (``la.tune_validation(state, val_data, ...)``).
    val_data : (x, y) or iterable of (x, y)
        Held-out data; linearised once.
    method : {"grid", "gradient"}
        ``"grid"``: every value of ``grid`` (times every temperature of
        ``temperatures`` if ``tune_temperature``), the lowest mean NLL wins
        (the first on ties); ``"gradient"``: Adam on the logarithms, from the
        state's values.
    grid : Tensor, optional
        Prior precisions to try (``default_grid``: ``logspace(-4, 4, 41)``).
    temperatures : Tensor, optional
        Temperatures to try with ``tune_temperature`` (default ``logspace(-2, 1, 13)``).
    tune_temperature : bool
        Tune the likelihood temperature too.
    prior_structure : {"scalar", "layerwise", "diag"}
        For ``"gradient"``: one prior precision, one per leaf or one per parameter.
    steps, lr
        Adam steps and learning rate for ``"gradient"``.
    link_approx, num_samples, generator
        The classification predictive (:func:`~funcbnn.laplace.predictive.predict`).
    chunk_size : int
        Inputs per linearisation pass.

    Returns
    -------
    (LaplaceState, ValidationInfo)
        The state with the chosen (detached) hyperparameters, and the search's record.

    Examples
    --------
    >>> import funcbnn, torch
    >>> from torch import nn
    >>> apply_fn, params, _ = funcbnn.functionalize(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)))
    >>> x, y = torch.randn(40, 2), torch.randint(0, 3, (40,))
    >>> la, state = funcbnn.laplace.fit(apply_fn, params, [(x[:30], y[:30])], "classification")
    >>> tuned, info = la.tune_validation(state, (x[30:], y[30:]), grid=torch.logspace(-2, 2, 5))
    >>> info.table.shape, bool(tuned.prior_precision in info.prior_precisions)
    (torch.Size([5, 1]), True)
    """
    if method not in ("grid", "gradient"):
        raise ValueError(f"method must be 'grid' or 'gradient', got {method!r}")
    batches = check_data(val_data)
    ref = state.sigma
    with torch.no_grad():
        lin = [(linearize(apply_fn, subset, state, x, chunk_size=chunk_size), y) for x, y in batches]
    opts = dict(link_approx=link_approx, num_samples=num_samples, generator=generator)
    _, _, temp0 = hyperparameters(state)
    if method == "grid":
        grid = default_grid(ref) if grid is None else torch.as_tensor(grid, dtype=ref.dtype, device=ref.device).reshape(-1)
        if tune_temperature:
            temps = torch.logspace(-2, 1, 13, dtype=ref.dtype, device=ref.device) if temperatures is None else torch.as_tensor(
                temperatures, dtype=ref.dtype, device=ref.device
            ).reshape(-1)
        else:
            temps = temp0.detach().reshape(1)
        for name, values in (("grid", grid), ("temperatures", temps)):
            if values.numel() == 0 or not bool((torch.isfinite(values) & (values > 0)).all()):
                raise ValueError(f"{name} must hold finite positive values")
        table = torch.empty(grid.numel(), temps.numel(), dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for i, p in enumerate(grid):
                for j, t in enumerate(temps):
                    table[i, j] = validation_nll(apply_fn, subset, lik, state, lin, prior_precision=p, temperature=t, **opts)
        # NaN (a failed predictive) never wins; argmin of the flattened table takes the first minimum.
        best = int(torch.nan_to_num(table, nan=math.inf).reshape(-1).argmin())
        i, j = divmod(best, temps.numel())
        new = state._replace(prior_precision=grid[i].clone(), temperature=temps[j].clone())
        return new, ValidationInfo(table[i, j], grid, temps, table)
    positive_int(steps, "steps")
    positive_float(lr, "lr")
    log_pp = initial_prior_precision(state.prior_precision, state.mean, prior_structure).log().clone().requires_grad_(True)
    log_t = temp0.detach().log().clone().requires_grad_(tune_temperature)
    opt = torch.optim.Adam([log_pp] + ([log_t] if tune_temperature else []), lr=lr)
    path_pp, path_t, objective = [], [], []
    for step in range(steps + 1):
        opt.zero_grad()
        loss = validation_nll(apply_fn, subset, lik, state, lin, prior_precision=log_pp.exp(), temperature=log_t.exp(), **opts)
        path_pp.append(log_pp.detach().exp())
        path_t.append(log_t.detach().exp())
        objective.append(loss.detach())
        if step == steps:
            break
        loss.backward()
        opt.step()
    k = int(torch.stack(objective).argmin())
    new = state._replace(prior_precision=path_pp[k].clone(), temperature=as_temperature(path_t[k], ref).clone())
    return new, ValidationInfo(objective[k], torch.stack(path_pp), torch.stack(path_t), torch.stack(objective))
