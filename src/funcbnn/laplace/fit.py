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

import optree
import torch
from torch import Tensor, nn

from .. import distributed
from .._validation import positive_int
from ..likelihoods import Likelihood, get_likelihood
from ..model import FunctionalModel
from ..priors import gaussian
from ..checks import check_finite, check_generator
from ._taps import shell_lock
from ._guards import check_curvature, check_eval_normalisation, check_state_fits, model_call, refuse_low_precision
from ._subset import Subset, split
from .curvature import Kind, check_data, dense_curvature, diag_curvature
from .kron import kron_curvature, kron_decompose
from .marglik import log_marglik, tune
from .predictive import Linearization, linearize, output_covariance, predict
from .state import (
    STRUCTURES,
    LaplaceState,
    as_prior_mean,
    as_prior_precision,
    as_sigma,
    as_temperature,
    family_of,
    leafwise,
    posterior,
    precision,
    prior_mean_of,
)
from .subnetwork import Subnetwork, check_subnetwork, scatter_into
from .validation import ValidationInfo, tune_validation

__all__ = ["Laplace", "fit", "from_state", "last_layer_names", "check_apply_fn"]


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
    log_marglik
        :func:`funcbnn.laplace.marglik.log_marglik`.
    tune : (state, *, method="marglik", val_data=None, **options) -> LaplaceState
        :func:`funcbnn.laplace.marglik.tune` (``method="marglik"``) or
        :func:`funcbnn.laplace.validation.tune_validation` (``method="val_nll"``, on ``val_data``).
    tune_validation : (state, val_data, **options) -> (LaplaceState, ValidationInfo)
        Validation-NLL tuning with its diagnostics.
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
    tune_validation: Callable[..., tuple[LaplaceState, ValidationInfo]]
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
    differs when a model defines its head before its body). A parametrized
    layer (``weight_norm``, ``spectral_norm``, ``torch.nn.utils.parametrize``)
    counts by the leaves its weight is computed from
    (``parametrizations.weight.original0``/``original1``, or ``original``),
    plus its bias, plain or parametrized.

    Examples
    --------
    >>> import funcbnn
    >>> from torch.nn.utils.parametrizations import weight_norm
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), weight_norm(nn.Linear(8, 2)))
    >>> apply_fn, params, _ = funcbnn.functionalize(net)
    >>> last_layer_names(apply_fn, params, torch.randn(4, 3))
    ['2.bias', '2.parametrizations.weight.original0', '2.parametrizations.weight.original1']
    """
    if not isinstance(apply_fn, FunctionalModel):
        raise TypeError("subset='last_layer' needs apply_fn from funcbnn.functionalize")
    candidates: dict[nn.Module, list[str]] = {}
    for name, mod in apply_fn.module.named_modules():
        prefix = f"{name}." if name else ""
        if not isinstance(mod, nn.Linear):  # a parametrized Linear is a subclass of nn.Linear
            continue
        # A parametrized tensor is no leaf of its own: its leaves live under parametrizations.<name>.
        owned = lambda k: k in (prefix + "weight", prefix + "bias") or any(  # noqa: E731
            k.startswith(f"{prefix}parametrizations.{t}.") and "." not in k[len(f"{prefix}parametrizations.{t}.") :]
            for t in ("weight", "bias")
        )
        weight = prefix + "weight" in params or any(k.startswith(prefix + "parametrizations.weight.") for k in params)
        if weight:
            candidates[mod] = [k for k in params if owned(k)]
    if not candidates:
        raise ValueError("subset='last_layer': the model has no nn.Linear layer with trainable weights")
    if x is None:
        return list(candidates.values())[-1]
    called: list[nn.Module] = []
    with shell_lock(apply_fn):  # the hooks sit on the shell other threads share until removed
        handles = [m.register_forward_hook(lambda m, i, o: called.append(m)) for m in candidates]
        try:
            with model_call(x, params, "x of data batch 0"), torch.no_grad():
                apply_fn({k: v.detach() for k, v in params.items()}, x)
        finally:
            for h in handles:
                h.remove()
    if not called:
        raise ValueError("subset='last_layer': no nn.Linear with trainable weights runs in the forward pass")
    return candidates[called[-1]]


def check_apply_fn(apply_fn: Any) -> None:
    """Refuse an ``nn.Module`` (or anything not callable) where ``apply_fn(params, x)`` is expected."""
    if isinstance(apply_fn, nn.Module):
        raise TypeError(
            f"apply_fn must be a function of (params, x), got the nn.Module {type(apply_fn).__name__} itself; "
            "call `apply_fn, params, _ = funcbnn.functionalize(model)` and pass apply_fn and params"
        )
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable as apply_fn(params, x), got {type(apply_fn).__name__}")


def _subset_names(apply_fn: Any, params: dict[str, Tensor], subset: Any, data: list) -> list[str]:
    if isinstance(subset, str) and subset not in ("all", "last_layer"):
        hint = f"; a single leaf goes in a list: subset=[{subset!r}]" if subset in params else ""
        raise ValueError(
            f"subset must be 'all', 'last_layer', an iterable of leaf names, a predicate or a Subnetwork, "
            f"got {subset!r}{hint}"
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
            raise ValueError(f"subset names {sorted(unknown)} are not leaves of params; {_leaf_hint(unknown, params)}")
        names = [k for k in params if k in wanted]
    if not names:
        raise ValueError("subset selects no leaves")
    return names


def _leaf_hint(unknown: set, params: dict[str, Tensor]) -> str:
    """What to write instead of names that are not leaves: a module's leaves, or the leaves there are."""
    for name in sorted(map(str, unknown)):
        inside = [k for k in params if k.startswith(name + ".")]
        if inside:
            return f"{name!r} is a module: name its leaves, e.g. {inside}"
    listed = list(params)
    more = f", ... ({len(listed)} leaves)" if len(listed) > 8 else ""
    return f"the leaves are {listed[:8]}{more}"


def subnetwork_model(apply_fn: Any, params: dict[str, Tensor], indices: dict[str, Tensor]) -> tuple[Callable, dict[str, Tensor]]:
    """``(model, sub)``: the model as a function of the chosen entries only, and their MAP values (1-D per leaf).

    ``model(sub, x) = apply_fn(params with sub written at indices, x)``; ``params`` is snapshotted.
    """
    base = {k: v.detach().clone() for k, v in params.items()}
    sub = {k: base[k].reshape(-1)[idx].clone() for k, idx in indices.items()}

    def model(p: dict[str, Tensor], x: Any) -> Any:
        return apply_fn(scatter_into(base, indices, p), x)

    return model, sub


def fit(
    apply_fn: Any,
    params: dict[str, Tensor],
    data: Iterable,
    likelihood: str | Likelihood,
    *,
    subset: Literal["all", "last_layer"] | Iterable[str] | Callable[[str, Tensor], bool] | Subnetwork = "all",
    structure: Literal["diag", "kron", "full"] = "diag",
    curvature: Kind = "ggn",
    prior_precision: float | Tensor | dict[str, Any] = 1.0,
    prior_mean: float | Tensor | dict[str, Any] = 0.0,
    temperature: float | Tensor = 1.0,
    sigma: float | Tensor | None = None,
    joint_bias: bool = True,
    num_mc: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int = 32,
    process_group: Any = None,
) -> tuple[Laplace, LaplaceState]:
    """Fit a Laplace approximation at ``params`` (a MAP estimate).

    Parameters
    ----------
    apply_fn, params
        From :func:`funcbnn.functionalize`, with ``params`` at the MAP (not the
        ``nn.Module`` itself).
    data : iterable of (x, y)
        The training data (all of it: curvature is summed over examples). With
        several inputs, ``x`` is a :class:`funcbnn.Inputs` whose every tensor
        has the leading batch axis of ``y`` (each is sliced per example; a 0-d
        tensor or another leading size is refused). A tensor shared by the
        whole batch goes into the model (closed over, or a module buffer), not
        into ``x``: one whose length happens to equal the batch size cannot be
        told apart and would be sliced too, which is the caller's to avoid.
    likelihood : str or Likelihood
        ``"categorical"`` / ``"classification"``, ``"gaussian"`` / ``"regression"``
        (sigma tunable), ``"bernoulli"`` / ``"binary"``, ``"heteroscedastic_gaussian"``.
    subset : {"all", "last_layer"}, iterable of names, predicate, or Subnetwork
        Leaves that get a posterior; the others stay at their MAP values. A
        :class:`~funcbnn.laplace.subnetwork.Subnetwork` picks single weights
        (subnetwork Laplace, Daxberger et al. 2021; structure ``"full"`` or
        ``"diag"``): the posterior's leaves are then the chosen entries, 1-D.
    structure : {"diag", "kron", "full"}
        Diagonal precision; Kronecker-factored blocks per Linear/Conv layer
        (KFAC, Martens & Grosse 2015; other leaves diagonal); or a dense one over
        the subset (last layer, subnetworks, small nets).
    process_group : torch.distributed group, optional
        ``data`` is this rank's shard (uneven or empty shards allowed): every
        rank accumulates its shard's curvature and loss statistics, one
        ``all_reduce`` sums them, and every rank returns the state one process
        gets on the whole data (``"mc_ggn"``: the same distribution, not the
        same label draws).
    curvature : {"ggn", "ef", "mc_ggn"}
        Exact GGN (default, as laplace-torch), empirical Fisher, or sampled-label GGN.
    prior_precision : number, Tensor or dict
        Initial prior precision: a scalar (number, 0-d or shape-``(1,)``
        tensor), one value per leaf ``(L,)``, one per parameter ``(P,)`` (leaves
        flattened in ``params`` order; not with ``"kron"``), or a dict of
        per-leaf values (scalars or leaf-shaped). Tune with ``la.tune``. A
        tensor keeps its graph in the state, so ``la.log_marglik(state)`` is
        differentiable in it.
    prior_mean : number, Tensor or dict
        Mean of the Gaussian prior (laplace-torch's ``prior_mean``): a scalar,
        one value per parameter, or a dict of per-leaf values. It enters the
        marginal likelihood's scatter term and the default prior of ``la.kl``;
        the posterior stays centred on ``params``.
    temperature : number or Tensor
        Likelihood temperature ``T`` (laplace-torch's ``temperature``): the
        curvature and the data term of the marginal likelihood are divided by
        ``T`` (``T < 1`` sharpens the posterior, "cold posteriors").
    sigma : number or Tensor, optional
        Initial observation noise std of a Gaussian likelihood (number, 0-d or
        shape-``(1,)`` tensor); by default the likelihood's own (1 for
        ``"gaussian"`` given by name).
    joint_bias : bool
        For ``"kron"``: one Kronecker block per layer over ``[W | b]`` (the
        default) or laplace-torch's separate weight and bias blocks. The joint
        block is KFAC as Martens & Grosse (2015) define it (the bias is a weight
        on a constant input), exact on a single example, and keeps the
        weight-bias correlations that separate blocks drop, at no extra cost.
    num_mc, generator
        Sampled labels per example for ``"mc_ggn"``, and their randomness.
    chunk_size : int
        Examples per vmapped call on the generic curvature path.

    Returns
    -------
    (Laplace, LaplaceState)

    Raises
    ------
    TypeError
        For an ``nn.Module`` passed as ``apply_fn`` (functionalize it first), a
        model whose output is not one tensor (a tuple or dict: wrap it), an
        integer ``generator``, or ``structure="full"`` on float16/bfloat16
        parameters (``"diag"`` and ``"kron"`` sum and decompose those in float32).
    ValueError
        Before any curvature is computed, naming the argument: ``x`` of a batch
        the model cannot run on (shape, dtype, device, token ids out of range;
        torch's error chained), targets the likelihood does not accept or on
        another device, an empty batch, BatchNorm on batch statistics or dropout
        in train mode, unknown ``subset`` names.
    funcbnn.checks.NonFiniteError
        For NaN or inf in a batch's inputs or targets, in ``params``, or in the
        accumulated curvature (outputs that overflow); off under
        ``funcbnn.checks.set_finite_checks(False)``.

    Notes
    -----
    Forwards that cannot run under ``vmap`` (recurrent layers, Python control
    flow on values) are differentiated one example at a time instead, with the
    same numbers.

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
    check_apply_fn(apply_fn)
    check_eval_normalisation(apply_fn)
    lik = get_likelihood(likelihood)
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be 'diag', 'kron' or 'full', got {structure!r}")
    if not isinstance(params, dict) or not params:
        raise TypeError("params must be a non-empty dict of tensors")
    if curvature not in ("ggn", "ef", "mc_ggn"):
        raise ValueError(f"curvature must be 'ggn', 'ef' or 'mc_ggn', got {curvature!r}")
    check_finite(params, "params")
    refuse_low_precision(params, structure)
    if not isinstance(joint_bias, bool):
        raise TypeError(f"joint_bias must be a bool, got {type(joint_bias).__name__}")
    ref = next(iter(params.values()))
    sd = as_sigma(sigma if sigma is not None else (lik.sigma if lik.sigma is not None else 1.0), ref)
    if lik.sigma is None and float(sd) != 1.0:
        raise ValueError(
            f"sigma applies to the 'gaussian' likelihood only (a fixed observation noise), not {lik.name!r}"
        )
    temp = as_temperature(temperature, ref)
    positive_int(num_mc, "num_mc")
    check_generator(generator)
    indices = None
    if isinstance(subset, Subnetwork):
        if structure == "kron":
            raise ValueError("a Subnetwork takes structure='full' (or 'diag'); its weights have no Kronecker layout")
        indices = check_subnetwork(subset, params)
        model, fit_params = subnetwork_model(apply_fn, params, indices)
        names = list(fit_params)
    else:
        if subset == "last_layer":
            data = check_data(data)  # materialised once: the first batch finds the layer called last
        model, fit_params = apply_fn, params
        names = _subset_names(apply_fn, params, subset, data)
    mean, fixed = split(fit_params, names, clone=True)  # snapshots: later edits to params do not reach the posterior
    pp = as_prior_precision(prior_precision, mean, ref)
    pm = as_prior_mean(prior_mean, mean, ref)
    if structure == "kron" and pp.dim() == 1 and pp.numel() != len(names):
        raise ValueError(
            "structure='kron' takes a scalar prior precision or one per leaf, not one per parameter "
            "(the Kronecker eigenbasis needs an isotropic prior within each block); use structure='diag' or 'full'"
        )

    empty_shard = False
    if process_group is not None:
        distributed.agree(
            {"params": distributed.fingerprint(params), "structure, curvature, likelihood": (structure, curvature, lik.name),
             "subset": names},
            process_group,
        )
        data, empty_shard = _borrow_if_empty(data, process_group)
    kw = dict(kind=curvature, num_mc=num_mc, generator=generator, chunk_size=chunk_size, subset=names)
    if structure == "diag":
        curv, stats = diag_curvature(model, fit_params, data, lik, **kw)
    elif structure == "kron":
        if not isinstance(apply_fn, FunctionalModel):
            raise TypeError("structure='kron' needs apply_fn from funcbnn.functionalize (it hooks the layers)")
        curv, stats = kron_curvature(apply_fn, params, data, lik, joint_bias=joint_bias, **kw)
    else:
        curv, stats = dense_curvature(model, fit_params, data, lik, **kw)
    if process_group is not None:
        curv, stats = _sum_over_ranks(curv, stats, empty_shard, process_group)
    check_curvature(curv)
    if structure == "kron":
        curv = kron_decompose(curv)
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
        prior_mean=pm,
        temperature=temp,
        indices=indices,
    )
    return _build(model, fixed, names, structure, lik, {k: v.shape for k, v in mean.items()}), state


def _borrow_if_empty(data: Any, process_group: Any) -> tuple[list, bool]:
    """This rank's batches; a rank with none borrows one example of the first rank that has data
    (its curvature is then zeroed), so every rank runs the same collectives on tensors of the same shapes."""
    try:
        batches = check_data(data)
    except ValueError:  # "data is empty"
        batches = []
    rank, size = distributed.world(process_group)
    has = [None] * size
    torch.distributed.all_gather_object(has, bool(batches), group=process_group)
    if all(has):
        return batches, False
    if not any(has):
        raise ValueError("data is empty on every rank of process_group")
    src = has.index(True)
    box = [None]
    if rank == src:
        x, y = batches[0]
        box = [(x[:1] if isinstance(x, Tensor) else x, y[:1])]
    torch.distributed.broadcast_object_list(box, src=torch.distributed.get_global_rank(process_group, src), group=process_group)
    return (batches, False) if batches else ([box[0]], True)


def _sum_over_ranks(curv: Any, stats: Any, empty_shard: bool, process_group: Any) -> tuple[Any, Any]:
    """Curvature and data statistics summed over the ranks (one all_reduce per dtype)."""
    totals = torch.stack([stats.loss.detach().double(), torch.tensor(float(stats.num_data), dtype=torch.float64),
                          torch.tensor(float(stats.num_outputs), dtype=torch.float64)])
    if empty_shard:  # the borrowed example only gave the shapes
        curv = optree.tree_map(torch.zeros_like, curv)
        totals = torch.zeros_like(totals)
    curv, totals = distributed.all_reduce_tree((curv, totals), process_group)
    return curv, type(stats)(totals[0].to(stats.loss.dtype), int(totals[1]), int(totals[2]))


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
        For a state that is not a ``LaplaceState``, an ``nn.Module`` as
        ``apply_fn``, leaves missing from ``params`` or of another shape, or a
        likelihood that does not match.

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
    check_apply_fn(apply_fn)
    check_eval_normalisation(apply_fn, "from_state")
    if not isinstance(state, LaplaceState):
        raise TypeError(f"state must be a LaplaceState (from funcbnn.laplace.fit), got {type(state).__name__}")
    if state.structure not in STRUCTURES:
        raise ValueError(f"state.structure must be one of {list(STRUCTURES)}, got {state.structure!r}")
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of tensors, got {type(params).__name__}")
    for k, v in state.mean.items():
        if k not in params:
            raise ValueError(f"params has no leaf {k!r}, which the state's posterior covers")
        if state.indices is None and params[k].shape != v.shape:
            raise ValueError(f"params[{k!r}] has shape {tuple(params[k].shape)}, the state's mean {tuple(v.shape)}")
        if state.indices is not None and (v.shape != state.indices[k].shape or int(state.indices[k].max()) >= params[k].numel()):
            raise ValueError(
                f"params[{k!r}] has shape {tuple(params[k].shape)}, too small for the state's subnetwork indices"
            )
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
    if state.indices is not None:
        model, fit_params = subnetwork_model(apply_fn, params, state.indices)
    else:
        model, fit_params = apply_fn, params
    _, fixed = split(fit_params, names, clone=True)
    return _build(model, fixed, names, state.structure, lik, {k: v.shape for k, v in state.mean.items()})


def _default_prior(state: LaplaceState) -> Any:
    """The state's own prior ``N(prior_mean, diag(prior_precision)^-1)`` as a :func:`funcbnn.priors.gaussian`."""
    pp = leafwise(state.prior_precision, state.mean)
    pm = leafwise(prior_mean_of(state), state.mean)
    return gaussian(
        std={k: pp[k].expand(m.shape).rsqrt() if pp[k].dim() else pp[k].rsqrt() for k, m in state.mean.items()},
        mean={k: pm[k].expand(m.shape) if pm[k].dim() else pm[k] for k, m in state.mean.items()},
    )


def _build(
    apply_fn: Any, fixed: Subset, names: list[str], structure: str, lik: Likelihood, shapes: dict[str, torch.Size]
) -> Laplace:
    family = family_of(structure)
    names_t = tuple(names)

    def fits(state: LaplaceState) -> None:
        # A state of another model or structure would otherwise fail inside torch (or worse, broadcast).
        check_state_fits(state, names_t, shapes, structure)

    def posterior_(state: LaplaceState, prior_precision: Any = None, sigma: Any = None, temperature: Any = None) -> Any:
        """:func:`funcbnn.laplace.state.posterior`: the family state at the state's (or the given) hyperparameters."""
        fits(state)
        return posterior(state, prior_precision, sigma, temperature)

    def precision_(state: LaplaceState, prior_precision: Any = None, sigma: Any = None, temperature: Any = None) -> Any:
        """:func:`funcbnn.laplace.state.precision`: the posterior precision in the structure's form."""
        fits(state)
        return precision(state, prior_precision, sigma, temperature)

    def sub_apply(sub: dict[str, Tensor], x: Any) -> Any:
        return apply_fn(fixed.merge(sub), x)

    def sample(state: LaplaceState, num_samples: int, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Draws of the posterior's leaves, each ``(num_samples, *leaf.shape)``: ``family.sample(posterior(state), ...)``."""
        return family.sample(posterior_(state), num_samples, generator=generator)

    def kl(state: LaplaceState, prior: Any = None, **kwargs: Any) -> Tensor:
        """``family.kl(posterior(state), prior)``; by default against the state's prior ``N(prior_mean, prior_precision^-1)``."""
        return family.kl(posterior_(state), _default_prior(state) if prior is None else prior, **kwargs)

    def tune_(state: LaplaceState, *, method: str = "marglik", val_data: Any = None, **kwargs: Any) -> LaplaceState:
        """Tune the hyperparameters: :func:`funcbnn.laplace.marglik.tune` (``method="marglik"``: ``per_leaf``,
        ``prior_structure``, ``tune_sigma``, ``steps``, ``lr``) or :func:`funcbnn.laplace.validation.tune_validation`
        (``method="val_nll"`` on ``val_data``)."""
        fits(state)
        if method == "marglik":
            if val_data is not None:
                raise ValueError("val_data is for method='val_nll'; the marginal likelihood needs no validation data")
            return tune(state, lik, **kwargs)
        if method == "val_nll":
            if val_data is None:
                raise ValueError("method='val_nll' needs val_data=(x_val, y_val) or an iterable of batches")
            return tune_validation_(state, val_data, **kwargs)[0]
        raise ValueError(f"method must be 'marglik' or 'val_nll', got {method!r}")

    def tune_validation_(state: LaplaceState, val_data: Any, **kwargs: Any) -> tuple[LaplaceState, ValidationInfo]:
        """:func:`funcbnn.laplace.validation.tune_validation` with the fitted model and likelihood."""
        fits(state)
        return tune_validation(apply_fn, fixed, lik, state, val_data, **kwargs)

    def log_marglik_(state: LaplaceState, prior_precision: Any = None, sigma: Any = None, temperature: Any = None) -> Tensor:
        """:func:`funcbnn.laplace.marglik.log_marglik` with the fitted likelihood."""
        fits(state)
        return log_marglik(state, lik, prior_precision, sigma, temperature)

    def linearize_(state: LaplaceState, x: Tensor, *, chunk_size: int = 64) -> Linearization:
        """:func:`funcbnn.laplace.predictive.linearize`: reuse the result in ``predict`` / ``output_covariance``."""
        fits(state)
        return linearize(apply_fn, fixed, state, x, chunk_size=chunk_size)

    def output_covariance_(state: LaplaceState, x: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """:func:`funcbnn.laplace.predictive.output_covariance` (``prior_precision``, ``sigma``, ``temperature``, ``chunk_size``)."""
        fits(state)
        return output_covariance(apply_fn, fixed, state, x, **kwargs)

    def predict_(state: LaplaceState, x: Any, **kwargs: Any) -> Any:
        """:func:`funcbnn.laplace.predictive.predict` with the fitted likelihood.

        ``x`` is inputs or ``linearize(state, x)``; keywords ``pred_type``,
        ``link_approx``, ``num_samples``, ``generator``, ``prior_precision``,
        ``sigma``, ``temperature``, ``chunk_size``.
        """
        fits(state)
        return predict(apply_fn, fixed, lik, state, x, **kwargs)

    return Laplace(
        family=family,
        posterior=posterior_,
        sample=sample,
        kl=kl,
        precision=precision_,
        log_marglik=log_marglik_,
        tune=tune_,
        tune_validation=tune_validation_,
        linearize=linearize_,
        output_covariance=output_covariance_,
        predict=predict_,
        apply_fn=sub_apply,
        structure=structure,
        names=tuple(names),
        likelihood=lik,
    )
