"""Fit a Laplace approximation at a MAP point, or rebuild one from a saved state.

:func:`fit` sums per-example curvature over the data (:mod:`~funcbnn.laplace.curvature`,
:mod:`~funcbnn.laplace.kron`) into a :class:`~funcbnn.laplace.LaplaceState` and
returns it with a :class:`Laplace`: pure functions of the state for the
posterior (a family state of :func:`funcbnn.families.diag_gaussian`,
:func:`~funcbnn.families.kron_gaussian` or :func:`~funcbnn.families.dense_gaussian`),
the marginal likelihood and its tuning (:mod:`~funcbnn.laplace.marglik`) and the
predictive (:mod:`~funcbnn.laplace.predictive`). :func:`from_state` builds the
same functions from a state and the model alone, so a state saved with
``torch.save`` predicts identically after ``torch.load`` in another process.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, NamedTuple

import torch
from torch import Tensor, nn

from .._validation import positive_int
from ..likelihoods import Likelihood, get_likelihood
from ..model import FunctionalModel
from ..priors import gaussian
from ._subset import Subset, split
from .curvature import Kind, check_data, dense_curvature, diag_curvature
from .kron import kron_curvature, kron_decompose
from .marglik import log_marglik, tune
from .predictive import Linearization, linearize, output_covariance, predict
from .state import STRUCTURES, LaplaceState, as_prior_precision, as_sigma, family_of, posterior, precision

__all__ = ["Laplace", "fit", "from_state", "last_layer_names"]


class Laplace(NamedTuple):
    """A fitted Laplace approximation's functions; every one takes the :class:`LaplaceState` first.

    Attributes
    ----------
    family
        The posterior family of the structure (``la.family.sample(la.posterior(state), n)``).
    posterior : (state, prior_precision=None, sigma=None) -> family state
        The family state at the state's (or the given) hyperparameters.
    sample, kl
        ``family.sample`` / ``family.kl`` of ``posterior(state)``; ``kl``'s
        prior defaults to the state's own ``N(0, prior_precision^-1)``.
    precision : (state, prior_precision=None, sigma=None)
        The posterior precision in the structure's form (:func:`funcbnn.laplace.state.precision`).
    log_marglik, tune
        :func:`funcbnn.laplace.marglik.log_marglik` and :func:`~funcbnn.laplace.marglik.tune`.
    linearize, output_covariance, predict
        :mod:`funcbnn.laplace.predictive`; ``predict`` and ``output_covariance``
        take inputs or ``linearize(state, x)``'s result.
    apply_fn : (sub, x) -> outputs
        The model with the posterior's leaves given and every other leaf at its
        fitted value, so ``funcbnn.sample_outputs(la.apply_fn, la.sample(state, S), x)``
        is the Monte-Carlo predictive.
    structure : str
    names : tuple of str
        The posterior's leaves (``state.mean``'s keys).
    likelihood : Likelihood
    """

    family: Any
    posterior: Callable[..., Any]
    sample: Callable[..., dict[str, Tensor]]
    kl: Callable[..., Tensor]
    precision: Callable[..., Any]
    log_marglik: Callable[..., Tensor]
    tune: Callable[..., LaplaceState]
    linearize: Callable[..., Linearization]
    output_covariance: Callable[..., tuple[Tensor, Tensor]]
    predict: Callable[..., Any]
    apply_fn: Callable[[dict[str, Tensor], Any], Any]
    structure: str
    names: tuple[str, ...]
    likelihood: Likelihood


def last_layer_names(apply_fn: FunctionalModel, params: dict[str, Tensor], x: Any = None) -> list[str]:
    """Leaf names of the last ``nn.Linear`` with a trainable weight.

    "Last" is in call order when example inputs ``x`` are given (one forward with
    hooks; ``fit`` passes its first batch), else in registration order (which
    differs when a model defines its head before its body).
    """
    if not isinstance(apply_fn, FunctionalModel):
        raise TypeError("subset='last_layer' needs apply_fn from funcbnn.functionalize")
    candidates: dict[nn.Module, list[str]] = {}
    for name, mod in apply_fn.module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.Linear) and prefix + "weight" in params:
            candidates[mod] = [prefix + "weight"] + ([prefix + "bias"] if prefix + "bias" in params else [])
    if not candidates:
        raise ValueError("subset='last_layer': the model has no nn.Linear layer with trainable weights")
    if x is None:
        return list(candidates.values())[-1]
    called: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda m, i, o: called.append(m)) for m in candidates]
    try:
        with torch.no_grad():
            apply_fn({k: v.detach() for k, v in params.items()}, x)
    finally:
        for h in handles:
            h.remove()
    if not called:
        raise ValueError("subset='last_layer': no nn.Linear with trainable weights runs in the forward pass")
    return candidates[called[-1]]


def _subset_names(apply_fn: Any, params: dict[str, Tensor], subset: Any, data: list) -> list[str]:
    if isinstance(subset, str) and subset not in ("all", "last_layer"):
        raise ValueError(
            f"subset must be 'all', 'last_layer', an iterable of leaf names or a predicate, got {subset!r}"
        )
    if subset == "all":
        names = list(params)
    elif subset == "last_layer":
        names = last_layer_names(apply_fn, params, data[0][0])
    elif callable(subset):
        names = [k for k, v in params.items() if subset(k, v)]
    else:
        wanted = set(subset)
        unknown = wanted - set(params)
        if unknown:
            raise ValueError(f"subset names {sorted(unknown)} are not leaves of params")
        names = [k for k in params if k in wanted]
    if not names:
        raise ValueError("subset selects no leaves")
    return names


def fit(
    apply_fn: Any,
    params: dict[str, Tensor],
    data: Iterable,
    likelihood: str | Likelihood,
    *,
    subset: Literal["all", "last_layer"] | Iterable[str] | Callable[[str, Tensor], bool] = "all",
    structure: Literal["diag", "kron", "full"] = "diag",
    curvature: Kind = "ggn",
    prior_precision: float | Tensor = 1.0,
    sigma: float | Tensor | None = None,
    num_mc: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int = 32,
) -> tuple[Laplace, LaplaceState]:
    """Fit a Laplace approximation at ``params`` (a MAP estimate).

    Parameters
    ----------
    apply_fn, params
        From :func:`funcbnn.functionalize`, with ``params`` at the MAP.
    data : iterable of (x, y)
        The training data (all of it: curvature is summed over examples).
    likelihood : str or Likelihood
        ``"categorical"`` / ``"classification"``, ``"gaussian"`` / ``"regression"``
        (sigma tunable), ``"bernoulli"`` / ``"binary"``, ``"heteroscedastic_gaussian"``.
    subset : {"all", "last_layer"}, iterable of names, or predicate
        Leaves that get a posterior; the others stay at their MAP values.
    structure : {"diag", "kron", "full"}
        Diagonal precision; Kronecker-factored blocks per Linear/Conv layer
        (KFAC, Martens & Grosse 2015; other leaves diagonal); or a dense one over
        the subset (last layer, small nets).
    curvature : {"ggn", "ef", "mc_ggn"}
        Exact GGN (default, as laplace-torch), empirical Fisher, or sampled-label GGN.
    prior_precision : number or Tensor
        Initial prior precision: a scalar (number, 0-d or shape-``(1,)`` tensor)
        or one value per leaf; tune with ``la.tune``. A tensor keeps its graph
        in the state, so ``la.log_marglik(state)`` is differentiable in it.
    sigma : number or Tensor, optional
        Initial observation noise std of a Gaussian likelihood (number, 0-d or
        shape-``(1,)`` tensor); by default the likelihood's own (1 for
        ``"gaussian"`` given by name).
    num_mc, generator
        Sampled labels per example for ``"mc_ggn"``, and their randomness.
    chunk_size : int
        Examples per vmapped call on the generic curvature path.

    Returns
    -------
    (Laplace, LaplaceState)

    Examples
    --------
    >>> from funcbnn import functionalize
    >>> net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> apply_fn, params, _ = functionalize(net)
    >>> x, y = torch.randn(32, 2), torch.randint(0, 3, (32,))
    >>> la, state = fit(apply_fn, params, [(x, y)], "classification", subset="last_layer", structure="full")
    >>> la.predict(state, x[:4]).shape
    torch.Size([4, 3])
    >>> type(la.posterior(state)).__name__
    'DenseGaussianState'
    """
    lik = get_likelihood(likelihood)
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be 'diag', 'kron' or 'full', got {structure!r}")
    if not isinstance(params, dict) or not params:
        raise TypeError("params must be a non-empty dict of tensors")
    if curvature not in ("ggn", "ef", "mc_ggn"):
        raise ValueError(f"curvature must be 'ggn', 'ef' or 'mc_ggn', got {curvature!r}")
    ref = next(iter(params.values()))
    sd = as_sigma(sigma if sigma is not None else (lik.sigma if lik.sigma is not None else 1.0), ref)
    if lik.sigma is None and float(sd) != 1.0:
        raise ValueError(
            f"sigma applies to the 'gaussian' likelihood only (a fixed observation noise), not {lik.name!r}"
        )
    positive_int(num_mc, "num_mc")
    if subset == "last_layer":
        data = check_data(data)  # materialised once: the first batch finds the layer called last
    names = _subset_names(apply_fn, params, subset, data)
    pp = as_prior_precision(prior_precision, names, params[names[0]])

    kw = dict(kind=curvature, num_mc=num_mc, generator=generator, chunk_size=chunk_size, subset=names)
    if structure == "diag":
        curv, stats = diag_curvature(apply_fn, params, data, lik, **kw)
    elif structure == "kron":
        if not isinstance(apply_fn, FunctionalModel):
            raise TypeError("structure='kron' needs apply_fn from funcbnn.functionalize (it hooks the layers)")
        factors, stats = kron_curvature(apply_fn, params, data, lik, **kw)
        curv = kron_decompose(factors)
    else:
        curv, stats = dense_curvature(apply_fn, params, data, lik, **kw)
    mean, fixed = split(params, names, clone=True)  # snapshots: later edits to params do not reach the posterior
    state = LaplaceState(
        mean=mean,
        curvature=curv,
        prior_precision=pp,
        sigma=sd,
        loss=stats.loss,
        num_data=torch.tensor(stats.num_data),
        num_outputs=torch.tensor(stats.num_outputs),
        structure=structure,
        likelihood=lik.name,
        # Gaussian curvature was taken at unit noise: the GGN scales as sigma^-2, the EF (squared
        # gradients of (f - y) / sigma^2) as sigma^-4.
        scale_power=0 if lik.sigma is None else (4 if curvature == "ef" else 2),
    )
    return _build(apply_fn, fixed, names, structure, lik), state


def from_state(
    apply_fn: Any, params: dict[str, Tensor], state: LaplaceState, *, likelihood: str | Likelihood | None = None
) -> Laplace:
    """The :class:`Laplace` functions of a fitted state, without data (e.g. after ``torch.load``).

    Parameters
    ----------
    apply_fn, params
        The model as :func:`funcbnn.functionalize` returns it; ``params`` gives
        the leaves outside the posterior (the posterior's own come from
        ``state.mean``), and is snapshotted.
    state : LaplaceState
        From :func:`fit` or ``la.tune``, possibly saved and loaded.
    likelihood : str or Likelihood, optional
        Needed only when the state was fitted with a likelihood object whose
        name is not registered; by default ``state.likelihood``.

    Returns
    -------
    Laplace
        Functions that give the same numbers as those :func:`fit` returned.

    Raises
    ------
    TypeError, ValueError
        For a state that is not a ``LaplaceState``, leaves missing from
        ``params`` or of another shape, or a likelihood that does not match.

    Examples
    --------
    >>> import io, funcbnn
    >>> apply_fn, params, _ = funcbnn.functionalize(nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)))
    >>> x, y = torch.randn(16, 2), torch.randint(0, 3, (16,))
    >>> la, state = fit(apply_fn, params, [(x, y)], "categorical", structure="kron")
    >>> buffer = io.BytesIO(); torch.save(state, buffer); _ = buffer.seek(0)
    >>> again = from_state(apply_fn, params, torch.load(buffer))
    >>> torch.equal(again.predict(state, x), la.predict(state, x))
    True
    """
    if not isinstance(state, LaplaceState):
        raise TypeError(f"state must be a LaplaceState (from funcbnn.laplace.fit), got {type(state).__name__}")
    if state.structure not in STRUCTURES:
        raise ValueError(f"state.structure must be one of {list(STRUCTURES)}, got {state.structure!r}")
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of tensors, got {type(params).__name__}")
    for k, v in state.mean.items():
        if k not in params:
            raise ValueError(f"params has no leaf {k!r}, which the state's posterior covers")
        if params[k].shape != v.shape:
            raise ValueError(f"params[{k!r}] has shape {tuple(params[k].shape)}, the state's mean {tuple(v.shape)}")
    try:
        lik = get_likelihood(state.likelihood if likelihood is None else likelihood)
    except ValueError as err:
        raise ValueError(f"{err}; pass likelihood= (the Likelihood the state was fitted with)") from None
    if (lik.sigma is not None) != (state.scale_power > 0):
        raise ValueError(
            f"likelihood {lik.name!r} does not match the state (fitted with {state.likelihood!r}, "
            f"curvature scale power {state.scale_power})"
        )
    names = list(state.mean)
    _, fixed = split(params, names, clone=True)
    return _build(apply_fn, fixed, names, state.structure, lik)


def _build(apply_fn: Any, fixed: Subset, names: list[str], structure: str, lik: Likelihood) -> Laplace:
    family = family_of(structure)

    def sub_apply(sub: dict[str, Tensor], x: Any) -> Any:
        return apply_fn(fixed.merge(sub), x)

    def sample(state: LaplaceState, num_samples: int, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Draws of the posterior's leaves, each ``(num_samples, *leaf.shape)``: ``family.sample(posterior(state), ...)``."""
        return family.sample(posterior(state), num_samples, generator=generator)

    def kl(state: LaplaceState, prior: Any = None, **kwargs: Any) -> Tensor:
        """``family.kl(posterior(state), prior)``; by default against the state's prior ``N(0, prior_precision^-1)``."""
        if prior is None:
            pp = state.prior_precision
            prior = gaussian(std={k: (pp if pp.dim() == 0 else pp[i]).rsqrt() for i, k in enumerate(state.mean)})
        return family.kl(posterior(state), prior, **kwargs)

    def tune_(state: LaplaceState, **kwargs: Any) -> LaplaceState:
        """:func:`funcbnn.laplace.marglik.tune` with the fitted likelihood (``per_leaf``, ``tune_sigma``, ``steps``, ``lr``)."""
        return tune(state, lik, **kwargs)

    def log_marglik_(state: LaplaceState, prior_precision: Any = None, sigma: Any = None) -> Tensor:
        """:func:`funcbnn.laplace.marglik.log_marglik` with the fitted likelihood."""
        return log_marglik(state, lik, prior_precision, sigma)

    def linearize_(state: LaplaceState, x: Tensor, *, chunk_size: int = 64) -> Linearization:
        """:func:`funcbnn.laplace.predictive.linearize`: reuse the result in ``predict`` / ``output_covariance``."""
        return linearize(apply_fn, fixed, state, x, chunk_size=chunk_size)

    def output_covariance_(state: LaplaceState, x: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """:func:`funcbnn.laplace.predictive.output_covariance` (``prior_precision``, ``sigma``, ``chunk_size``)."""
        return output_covariance(apply_fn, fixed, state, x, **kwargs)

    def predict_(state: LaplaceState, x: Any, **kwargs: Any) -> Any:
        """:func:`funcbnn.laplace.predictive.predict` with the fitted likelihood.

        ``x`` is inputs or ``linearize(state, x)``; keywords ``pred_type``,
        ``link_approx``, ``num_samples``, ``generator``, ``prior_precision``,
        ``sigma``, ``chunk_size``.
        """
        return predict(apply_fn, fixed, lik, state, x, **kwargs)

    return Laplace(
        family=family,
        posterior=posterior,
        sample=sample,
        kl=kl,
        precision=precision,
        log_marglik=log_marglik_,
        tune=tune_,
        linearize=linearize_,
        output_covariance=output_covariance_,
        predict=predict_,
        apply_fn=sub_apply,
        structure=structure,
        names=tuple(names),
        likelihood=lik,
    )
