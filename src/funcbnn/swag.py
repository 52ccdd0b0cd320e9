"""SWAG: a Gaussian posterior from the moments of an SGD trajectory (Maddox et al. 2019).

"A Simple Baseline for Bayesian Uncertainty in Deep Learning": run SGD with a
constant (or cyclical) learning rate and, every ``c`` steps after a burn-in,
record the iterate ``theta_i``. With ``n`` iterates recorded,

- ``theta_SWA = mean_i theta_i`` (SWA, Izmailov et al. 2018),
- ``Sigma_diag = diag(mean_i theta_i^2 - theta_SWA^2)``,
- ``D = [theta_i - theta_SWA^(i)]`` for the last ``K`` iterates (the deviation
  from the running mean *after* iterate ``i``, as the reference code does),

and the posterior is ``N(theta_SWA, scale (Sigma_diag + D D^T / (k - 1)))``
with ``k = min(n, K)`` columns and ``scale = 1/2`` (the paper's
``1/2 (Sigma_diag + Sigma_low-rank)``). The reference code divides by ``K - 1``
even before ``K`` columns exist; here it is ``k - 1``, the unbiased sample
covariance of the columns held.

Everything is a pure function of a :class:`SWAGState` (a pytree):

    state = swag.init(params, max_rank=20)
    for epoch in range(epochs):
        ...                                  # any training loop, any optimiser
        state = swag.update(state, params)   # after a burn-in, every c steps or epochs
    post, q = swag.posterior(state)          # lowrank_gaussian family and its state
    samples = post.sample(q, 30, generator=g)

:func:`bn_update` recomputes BatchNorm statistics for every weight sample, and
:func:`fit` runs SGD and collects in one call.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Iterable, Literal, NamedTuple

import optree
import torch
from torch import Tensor, nn

from . import distributed
from ._checkpoint import checkpoint_of, load_optimizer
from ._validation import positive_float, positive_int
from .checks import DivergedError, check_finite, describe, finite_checks_enabled, guarded_call
from .families.diag_gaussian import DiagGaussian, DiagGaussianState, diag_gaussian
from .families.lowrank_gaussian import LowRankGaussian, LowRankGaussianState, lowrank_gaussian
from .families.mixture import Mixture, MixtureState, mixture
from .likelihoods import Likelihood, get_likelihood
from .model import _STATS_LAYERS, FunctionalModel
from .tree import Tree, check_same_structure, leaf_names

__all__ = [
    "SWAGState",
    "SWAGResult",
    "init",
    "update",
    "posterior",
    "swa",
    "deviations",
    "multiswag",
    "bn_update",
    "with_buffers",
    "fit",
]


class SWAGState(NamedTuple):
    """The running moments of an SGD trajectory.

    Attributes
    ----------
    mean : Tree
        ``mean_i theta_i``.
    sq_mean : Tree
        ``mean_i theta_i^2``.
    deviations : tuple of Tree
        A ring buffer of the last ``K`` deviation columns, each a tree like the
        parameters; iterate ``i`` (1-based) sits at position ``(i - 1) % K``.
        (A tuple of trees, not one stacked tree, so that :func:`update` replaces
        one column without copying the other ``K - 1``.)
    num_models : Tensor
        0-d int64, the number of iterates recorded.
    """

    mean: Tree
    sq_mean: Tree
    deviations: tuple
    num_models: Tensor


def _check_params(params: Tree, name: str) -> None:
    leaves = optree.tree_leaves(params)
    if not leaves or not all(isinstance(t, Tensor) and t.is_floating_point() for t in leaves):
        raise TypeError(f"{name} must be a non-empty tree of floating-point tensors")


def _check_state(state: Any) -> SWAGState:
    if not isinstance(state, SWAGState):
        raise TypeError(f"state must be a SWAGState from swag.init, got {type(state).__name__}")
    return state


def init(params: Tree, *, max_rank: int = 20) -> SWAGState:
    """An empty SWAG state for parameters shaped like ``params``, keeping at most ``max_rank`` deviations.

    Examples
    --------
    >>> state = init({"w": torch.zeros(3)}, max_rank=5)
    >>> state = update(state, {"w": torch.ones(3)})
    >>> int(state.num_models), len(state.deviations), state.deviations[0]["w"].shape
    (1, 5, torch.Size([3]))
    """
    _check_params(params, "params")
    max_rank = positive_int(max_rank, "max_rank")
    zeros = optree.tree_map(lambda t: torch.zeros_like(t.detach()), params)
    return SWAGState(
        mean=zeros,
        sq_mean=optree.tree_map(torch.zeros_like, zeros),
        deviations=tuple(optree.tree_map(torch.zeros_like, zeros) for _ in range(max_rank)),
        num_models=torch.zeros((), dtype=torch.int64),
    )


def update(state: SWAGState, params: Tree) -> SWAGState:
    """Record one iterate: a new state with the running moments and the newest deviation column.

    Pure: neither ``state`` nor ``params`` is changed; the new state shares the
    ``K - 1`` untouched deviation columns with the old one, so an update costs a
    few passes over the parameters.
    """
    state = _check_state(state)
    check_same_structure(state.mean, params, "params")
    for path, m, t in zip(leaf_names(params), optree.tree_leaves(state.mean), optree.tree_leaves(params)):
        if t.dtype != m.dtype:
            raise TypeError(f"params leaf '{path}' has dtype {t.dtype}, but the SWAG state holds {m.dtype}")
    n = int(state.num_models) + 1
    with torch.no_grad():
        theta = optree.tree_map(lambda t: t.detach(), params)
        mean = optree.tree_map(lambda m, t: m + (t - m) / n, state.mean, theta)
        sq_mean = optree.tree_map(lambda s, t: s + (t * t - s) / n, state.sq_mean, theta)
        devs = list(state.deviations)
        devs[(n - 1) % len(devs)] = optree.tree_map(torch.sub, theta, mean)
    return SWAGState(mean, sq_mean, tuple(devs), torch.tensor(n, dtype=torch.int64))


def _require_models(state: SWAGState) -> int:
    n = int(_check_state(state).num_models)
    if n < 1:
        raise ValueError("the SWAG state holds no iterates yet; call swag.update(state, params) first")
    return n


def swa(state: SWAGState) -> Tree:
    """The SWA solution ``mean_i theta_i`` (Izmailov et al. 2018), a parameter tree."""
    _require_models(state)
    return optree.tree_map(torch.clone, state.mean)


def deviations(state: SWAGState) -> Tree:
    """The deviation columns held, oldest first: leaves ``(k, *leaf.shape)`` with ``k = min(n, K)``."""
    n = _require_models(state)
    cap = len(state.deviations)
    k = min(n, cap)
    columns = [state.deviations[(n - k + j) % cap] for j in range(k)]  # chronological order of the ring
    return optree.tree_map(lambda *c: torch.stack(c), *columns)


def posterior(
    state: SWAGState,
    *,
    form: Literal["lowrank", "diag"] = "lowrank",
    scale: float = 0.5,
    var_clamp: float = 1e-30,
) -> tuple[LowRankGaussian | DiagGaussian, LowRankGaussianState | DiagGaussianState]:
    """The SWAG posterior as a family and its state.

    Parameters
    ----------
    state : SWAGState
    form : {"lowrank", "diag"}
        ``"lowrank"``: ``N(theta_SWA, scale (Sigma_diag + D D^T/(k-1)))`` as a
        :func:`~funcbnn.families.lowrank_gaussian` state; ``"diag"``: SWAG-diagonal,
        ``N(theta_SWA, scale Sigma_diag)`` as a :func:`~funcbnn.families.diag_gaussian` state.
    scale : float, default 0.5
        Multiplies the covariance (the paper's 1/2).
    var_clamp : float, default 1e-30
        Floor of the diagonal variance (``mean(theta^2) - mean(theta)^2`` can
        round below 0), as in the reference code.

    Returns
    -------
    (family, family_state)
    """
    n = _require_models(state)
    scale = positive_float(scale, "scale")
    var_clamp = positive_float(var_clamp, "var_clamp")
    if form not in ("lowrank", "diag"):
        raise ValueError(f"form must be 'lowrank' or 'diag', got {form!r}")
    if form == "diag" and n < 2:
        raise ValueError("the SWAG state holds 1 iterate: a variance needs at least 2 (call swag.update again)")
    var = optree.tree_map(lambda s, m: (s - m * m).clamp_min(var_clamp), state.sq_mean, state.mean)
    mean = optree.tree_map(torch.clone, state.mean)
    if form == "diag":
        post = diag_gaussian()
        return post, post.from_moments(mean, optree.tree_map(lambda v: (scale * v).sqrt(), var))
    if len(state.deviations) < 2:
        raise ValueError(
            "max_rank=1 keeps no low-rank information (one deviation column has no spread); "
            "use form='diag' or swag.init(..., max_rank >= 2)"
        )
    if n < 2:
        raise ValueError(
            "the SWAG state holds 1 iterate: a covariance needs at least 2 (call swag.update again, "
            "or lower collect_every in swag.fit)"
        )
    cols = deviations(state)
    k = min(n, len(state.deviations))
    factor = optree.tree_map(lambda d: d * math.sqrt(scale / max(k - 1, 1)), cols)
    return lowrank_gaussian(), LowRankGaussianState(mean, optree.tree_map(lambda v: scale * v, var), factor)


def multiswag(
    states: Iterable[SWAGState],
    *,
    form: Literal["lowrank", "diag"] = "lowrank",
    scale: float = 0.5,
    var_clamp: float = 1e-30,
) -> tuple[Mixture, MixtureState]:
    """MultiSWAG (Wilson & Izmailov 2020): the equal-weight mixture of several SWAG posteriors.

    Returns a :func:`~funcbnn.families.mixture` family over the components'
    family and its state; ``sample`` draws from every component in turn.
    """
    states = [_check_state(s) for s in states]
    if not states:
        raise ValueError("states must hold at least one SWAGState")
    for i, s in enumerate(states[1:], 1):
        check_same_structure(states[0].mean, s.mean, f"states[{i}].mean")
    pairs = [posterior(s, form=form, scale=scale, var_clamp=var_clamp) for s in states]
    return mixture(pairs[0][0]), MixtureState(tuple(q for _, q in pairs))


# --- BatchNorm statistics -----------------------------------------------------------------------


def bn_update(
    apply_fn: FunctionalModel,
    samples: Tree,
    data: Iterable,
    *,
    buffers: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """BatchNorm running statistics recomputed for every weight sample, with one pass over ``data`` each.

    What the SWAG reference code does before predicting (``bn_update``): the
    statistics are reset and re-estimated with the normalisation layers in
    training mode, as the average of the batch statistics weighted by batch
    size (batch means and unbiased batch variances; per-instance variances for
    InstanceNorm), which with equal batches is what
    ``torch.optim.swa_utils.update_bn`` computes. Only the normalisation layers
    switch to training mode (the reference code puts the whole network in
    training mode, dropout included). ``data`` is iterated once per sample (a
    one-shot iterator is materialised first). Functional: ``apply_fn`` and its
    module are never changed.

    Parameters
    ----------
    apply_fn : FunctionalModel
        From :func:`funcbnn.functionalize`.
    samples : Tree
        Weight samples with a leading axis ``S``.
    data : iterable of batches
        ``x`` or ``(x, y)`` batches (targets are ignored).
    buffers : dict, optional
        Buffers to start from (default ``apply_fn.buffers``); other buffers are kept.

    Returns
    -------
    dict[str, Tensor]
        Buffers with a leading axis ``S``; pass them with :func:`with_buffers`.
    """
    if not isinstance(apply_fn, FunctionalModel):
        raise TypeError(f"apply_fn must come from funcbnn.functionalize, got {type(apply_fn).__name__}")
    apply_fn.check_params(samples, "samples", leading=1)
    base = dict(apply_fn.buffers if buffers is None else buffers)
    if iter(data) is data:  # a one-shot iterator: keep its batches for the passes of every sample
        data = list(data)
    inputs = lambda: (b[0] if isinstance(b, (tuple, list)) else b for b in data)  # noqa: E731
    num_batches = 0
    for x in inputs():
        num_batches += 1
        if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] < 2:
            raise ValueError(
                f"data batch {num_batches - 1} has {x.shape[0]} example; BatchNorm statistics need batches "
                "of "
                "at least 2 (drop_last=True in the DataLoader)"
            )
    if not num_batches:
        raise ValueError("data is empty: bn_update needs at least one batch")
    layers = {
        name: m
        for name, m in apply_fn.module.named_modules()
        if isinstance(m, _STATS_LAYERS) and m.track_running_stats
    }
    num = optree.tree_leaves(samples)[0].shape[0]
    if not layers:
        return {k: v.expand(num, *v.shape).clone() for k, v in base.items()}

    # The same module code with the statistics layers in training mode: they normalise
    # with batch statistics (what downstream layers see during the pass) and a hook records them.
    train_fn = FunctionalModel(
        _train_mode_copy(apply_fn.module, set(layers)), apply_fn.params_template, apply_fn.frozen, apply_fn.buffers
    )
    shell_layers = {n: m for n, m in train_fn.module.named_modules() if n in layers}
    sums: dict[str, list[Tensor]] = {}

    def record(name: str) -> Callable:
        instance = isinstance(layers[name], nn.modules.instancenorm._InstanceNorm)

        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach()
            if instance:
                # InstanceNorm records the mean over instances of each instance's own (unbiased) variance
                dims = list(range(2, x.dim()))
                mean, var = x.mean(dims).mean(0), x.var(dims, correction=1).mean(0)
            else:
                dims = [d for d in range(x.dim()) if d != 1]
                mean, var = x.mean(dims), x.var(dims, correction=1)
            acc = sums.setdefault(name, [torch.zeros_like(mean), torch.zeros_like(var), 0])
            b = x.shape[0]
            acc[0] += b * mean
            acc[1] += b * var
            acc[2] += b

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in shell_layers.items()]
    out: list[dict[str, Tensor]] = []
    try:
        leaves, spec = optree.tree_flatten(samples)
        for s in range(num):
            params = optree.tree_unflatten(spec, [t[s] for t in leaves])
            sums.clear()
            with torch.no_grad():
                for x in inputs():
                    train_fn(params, x, base)
            new = dict(base)
            for name, (m_sum, v_sum, count) in sums.items():
                prefix = f"{name}." if name else ""
                new[prefix + "running_mean"] = (m_sum / count).to(base[prefix + "running_mean"].dtype)
                new[prefix + "running_var"] = (v_sum / count).to(base[prefix + "running_var"].dtype)
                if prefix + "num_batches_tracked" in new:
                    new[prefix + "num_batches_tracked"] = torch.tensor(num_batches, dtype=torch.int64)
            out.append(new)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.stack([o[k] for o in out]) for k in base}


def _train_mode_copy(module: nn.Module, names: set[str]) -> nn.Module:
    from .model import _structural_copy

    shell = _structural_copy(module)
    for name, m in shell.named_modules():
        if name in names:
            m.training = True
    return shell


def with_buffers(apply_fn: FunctionalModel) -> Callable[[dict[str, Tree], Any], Any]:
    """``f({"params": p, "buffers": b}, x) = apply_fn(p, x, b)``, so per-sample buffers ride along with
    per-sample weights through :func:`funcbnn.sample_outputs`.

    Examples
    --------
    >>> # outputs = sample_outputs(with_buffers(apply_fn), {"params": samples, "buffers": bn_update(...)}, x)
    """
    if not isinstance(apply_fn, FunctionalModel):
        raise TypeError(f"apply_fn must come from funcbnn.functionalize, got {type(apply_fn).__name__}")

    def f(tree: dict[str, Tree], x: Any) -> Any:
        return apply_fn(tree["params"], x, tree["buffers"])

    return f


# --- SGD and collection in one call -------------------------------------------------------------


class SWAGResult(NamedTuple):
    """What :func:`fit` returns: the SWAG state, the last SGD iterate and the loss of every step.

    ``checkpoint`` holds what :func:`fit` needs to continue bit-identically
    (``fit(..., resume=result)``): the SGD iterate, the optimiser's
    ``state_dict`` (momentum), the SWAG moments and ring buffer, the epochs and
    collection steps done and the history; plain tensors, dicts and lists, so
    ``torch.load`` with ``weights_only=True`` reads it.
    """

    state: SWAGState
    params: Tree
    history: Tensor
    checkpoint: dict | None = None


# Saved states and results load with plain torch.load (weights_only=True).
torch.serialization.add_safe_globals([SWAGState, SWAGResult])

_CHECKPOINT_FORMAT = "funcbnn.swag.fit"


def _sharded_mean_loss(apply_fn, theta, leaves, x, y, lik, buffers, process_group) -> Tensor:
    """Backward of the mean NLL over the union of the ranks' batches; returns that mean.

    Each rank differentiates its batch's *sum* of NLLs; summing gradients and
    counts over ranks and dividing gives the gradient of the global mean, also
    for uneven (or empty) batches.
    """
    n_local = y.shape[0]
    if n_local:
        out = apply_fn(theta, x) if buffers is None else apply_fn(theta, x, buffers)
        total = lik.nll(out, y).sum()
        total.backward()
    else:
        total = y.new_zeros((), dtype=leaves[0].dtype)
    stats = distributed.all_reduce_tree(
        torch.stack([total.detach().to(leaves[0].dtype), torch.tensor(float(n_local), dtype=leaves[0].dtype)]),
        process_group,
    )
    grads = distributed.all_reduce_tree([p.grad if p.grad is not None else torch.zeros_like(p) for p in leaves], process_group)
    for p, g in zip(leaves, grads):
        p.grad = g / stats[1]
    return stats[0] / stats[1]


def _lr_at(step_in_cycle: int, cycle: int, lr: float, lr_min: float, schedule: str) -> float:
    if schedule == "constant":
        return lr
    # cyclical (Izmailov et al. 2018): linear from lr down to lr_min within each cycle, collecting at its end
    frac = (step_in_cycle + 1) / cycle
    return (1 - frac) * lr + frac * lr_min


def _checkpoint_of(resume: Any) -> dict | None:
    if resume is None:
        return None
    if isinstance(resume, SWAGResult) and resume.checkpoint is None:
        raise ValueError(
            "resume: this SWAGResult carries no checkpoint (saved with checkpoint=None?); "
            "resume from one that has it"
        )
    ck = resume.checkpoint if isinstance(resume, SWAGResult) else resume
    if not (isinstance(ck, dict) and ck.get("format") == _CHECKPOINT_FORMAT):
        raise TypeError(
            "resume must be a SWAGResult of swag.fit or its .checkpoint (a dict with format "
            f"{_CHECKPOINT_FORMAT!r}), got {describe(resume)}"
        )
    return ck


def _batch_pair(batch: Any, where: str) -> tuple[Any, Tensor]:
    if isinstance(batch, dict):
        raise TypeError(
            f"data {where} must be an (x, y) pair, got a dict with keys {sorted(map(str, batch))}; "
            "yield (x, y) pairs instead, e.g. a DataLoader collate_fn returning (b['x'], b['y'])"
        )
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"data {where} must be an (x, y) pair, got {describe(batch)}")
    x, y = batch
    if not isinstance(y, Tensor) or y.dim() == 0:
        raise TypeError(
            f"data {where}: targets must be a tensor with a leading batch axis, got {describe(y)}"
        )
    return x, y


def fit(
    apply_fn: Callable[..., Any],
    params: Tree,
    data: Iterable,
    likelihood: str | Likelihood = "categorical",
    *,
    epochs: int = 10,
    burn_in: int = 0,
    lr: float = 0.01,
    lr_min: float | None = None,
    schedule: Literal["constant", "cyclical"] = "constant",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    collect_every: int | None = None,
    max_rank: int = 20,
    buffers: dict[str, Tensor] | None = None,
    resume: SWAGResult | dict | None = None,
    progress: bool = False,
    process_group: Any = None,
) -> SWAGResult:
    """Run SGD from ``params`` and collect a SWAG state along the way.

    ``burn_in`` epochs of SGD at ``lr``, then ``epochs`` epochs during which an
    iterate is recorded every ``collect_every`` steps (default: once per epoch,
    as in the paper). ``schedule="cyclical"`` lowers the rate linearly from
    ``lr`` to ``lr_min`` within every collection cycle and records at the cycle's
    end (the low point). The loss is the batch-mean NLL of ``likelihood``;
    ``weight_decay`` is SGD's (an isotropic Gaussian prior).

    Parameters
    ----------
    apply_fn, params
        From :func:`funcbnn.functionalize` (``params`` is not changed).
    data : iterable of (x, y)
        Re-iterated every epoch (a ``DataLoader`` reshuffles if told to).
    likelihood : str or Likelihood
    resume : SWAGResult or dict, optional
        A result of an earlier ``fit`` (or its ``.checkpoint``, also after
        ``torch.save``/``torch.load``): SGD continues from its iterate,
        momentum, SWAG moments, ring buffer and cycle position for ``epochs``
        more collecting epochs (``burn_in`` is not repeated), and the history
        continues. With the same other arguments and the same batches in each
        epoch (a list, or a loader that does not shuffle: a shuffling
        ``DataLoader`` draws from its own RNG, which the checkpoint does not
        hold), ``fit(epochs=2)`` then ``fit(epochs=2, resume=...)`` equals
        ``fit(epochs=4)`` bit for bit. ``params`` must be shaped like the
        checkpoint's iterate.
    progress : bool, default False
        Print one line per epoch to stderr.
    process_group : torch.distributed group, optional
        Data-parallel SGD: ``data`` is this rank's shard (every rank the same
        number of batches; batch sizes may differ, a rank may have empty
        batches), gradients are combined so that each step follows the mean
        loss over the union of the ranks' batches, and every rank ends with the
        state one process gets on the concatenated batches.

    Returns
    -------
    SWAGResult
        ``(state, params, history, checkpoint)``.

    Raises
    ------
    ValueError
        Data with no batches; inputs the model cannot run on (named, with their
        shape and dtype); targets that do not fit the likelihood; NaN or inf in
        inputs or targets (:class:`~funcbnn.checks.NonFiniteError`, naming the batch).
    funcbnn.checks.DivergedError
        The loss became non-finite: ``error.step`` is the step (over the whole
        run), ``error.state`` the SGD iterate that step started from.

    Examples
    --------
    >>> import funcbnn
    >>> apply_fn, params, _ = funcbnn.functionalize(torch.nn.Linear(2, 1))
    >>> x = torch.randn(32, 2); y = x @ torch.tensor([[1.0], [-1.0]])
    >>> res = fit(apply_fn, params, [(x, y)], "regression", epochs=5, lr=0.05, collect_every=1)
    >>> int(res.state.num_models)
    5
    >>> more = fit(apply_fn, params, [(x, y)], "regression", epochs=3, lr=0.05, collect_every=1, resume=res)
    >>> int(more.state.num_models), more.history.shape
    (8, torch.Size([8]))
    """
    lik = get_likelihood(likelihood)
    epochs = positive_int(epochs, "epochs")
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
        raise ValueError(f"burn_in must be an int >= 0 (epochs), got {burn_in!r}")
    lr = positive_float(lr, "lr")
    if schedule not in ("constant", "cyclical"):
        raise ValueError(f"schedule must be 'constant' or 'cyclical', got {schedule!r}")
    lr_min = lr * 0.01 if lr_min is None else positive_float(lr_min, "lr_min")
    if schedule == "cyclical" and lr_min > lr:
        raise ValueError(f"lr_min must not exceed lr for the cyclical schedule (it falls from lr to lr_min), got lr={lr}, lr_min={lr_min}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if isinstance(data, (Tensor, dict, str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be an iterable of (x, y) batches, got {describe(data)}")
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data):
        # (x, y) tensors would iterate as single tensors (x, then y): say what swag.fit takes
        raise TypeError(
            f"data must be an iterable of (x, y) batches, got a {type(data).__name__} of {len(data)} "
            "tensors; "
            "pass [(x, y)] for one full batch, or a DataLoader"
        )
    batches = list(data) if not hasattr(data, "__len__") else data
    steps_per_epoch = len(batches)
    if steps_per_epoch == 0:
        raise ValueError(
            "data yielded no batches (the loader is empty): swag.fit needs at least one (x, y) batch"
        )
    cycle = steps_per_epoch if collect_every is None else positive_int(collect_every, "collect_every")
    _check_params(params, "params")
    check_finite(params, "params")
    ck = checkpoint_of(resume, SWAGResult, _CHECKPOINT_FORMAT, "swag.fit")
    start = params if ck is None else ck["params"]
    if ck is not None:
        try:
            check_same_structure(params, start, "resume: the checkpoint's params")
        except (TypeError, ValueError) as e:
            raise ValueError(f"resume: the checkpoint's iterate is not shaped like params: {e}") from e
    theta = optree.tree_map(lambda t: t.detach().clone().requires_grad_(True), start)
    leaves = optree.tree_leaves(theta)
    opt = torch.optim.SGD(leaves, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if ck is None:
        state, step, done, burn = init(theta, max_rank=max_rank), 0, 0, burn_in
    else:
        load_optimizer(opt, ck["optimizer"], "params")
        saved_rank = len(ck["state"].deviations)  # the ring buffer's length is the rank it was built with
        if saved_rank != max_rank:
            raise ValueError(
                f"resume: the checkpoint collects {saved_rank} deviation columns but max_rank={max_rank}; "
                f"pass max_rank={saved_rank} to continue it"
            )
        state, step, done, burn = ck["state"], int(ck["step"]), int(ck["epochs"]), 0
    distributed.agree(
        {
            "params": distributed.fingerprint(start),
            "batches per epoch": steps_per_epoch,
            "epochs": (burn, epochs),
        },
        process_group,
    )
    history: list[Tensor] = []
    previous = 0 if ck is None else int(ck["history"].shape[0])
    for epoch in range(burn + epochs):
        collecting = epoch >= burn
        first_epoch = epoch == 0
        for b, batch in enumerate(batches):
            where = f"batch {b} of epoch {done + epoch}"
            x, y = _batch_pair(batch, where)
            # detached: data that requires grad would collect every step's gradient in the caller's .grad
            x, y = optree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, (x, y))
            if isinstance(y, Tensor) and y.dim() and y.shape[0] == 0:
                # the mean loss of no examples is NaN: say so, not "diverged"
                raise ValueError(f"data {where} is empty (targets of shape {tuple(y.shape)}): drop empty batches")
            check_finite(x, "data inputs", context=where)
            check_finite(y, "data targets", context=where)
            if collecting:
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step % cycle, cycle, lr, lr_min, schedule)
            opt.zero_grad()
            if process_group is None:
                try:
                    with guarded_call(x, theta, "the data inputs", f"swag.fit ({where})"):
                        out = apply_fn(theta, x) if buffers is None else apply_fn(theta, x, buffers)
                except ValueError as e:
                    if "more than 1 value per channel" not in str(e):
                        raise
                    raise ValueError(
                        f"swag.fit ({where}): the data inputs ({describe(x)}) are too few for a train-mode "
                        "BatchNorm, which needs at least 2 examples per batch: drop the short last batch "
                        f"(DataLoader(..., drop_last=True)). Torch said: {e}"
                    ) from e
                if first_epoch:  # the outputs' type, the targets' shape, dtype and range: once per batch
                    if not isinstance(out, Tensor):
                        raise TypeError(
                            "the model must return one Tensor (what the likelihood scores), got "
                            f"{describe(out)}; "
                            "wrap it to return that tensor, e.g. apply_fn=lambda params, x: "
                            "model_fn(params, x)[0]"
                        )
                    try:
                        lik.check(out, y)
                    except ValueError as e:
                        raise ValueError(
                            f"data targets ({where}) do not fit the likelihood '{lik.name}': {e}"
                        ) from None
                loss = lik.nll(out, y).mean()
                loss.backward()
            else:
                loss = _sharded_mean_loss(apply_fn, theta, leaves, x, y, lik, buffers, process_group)
            if finite_checks_enabled() and not math.isfinite(loss.detach().item()):
                index = previous + len(history)
                raise DivergedError(
                    f"step {index} ({where}): the SGD loss became {loss.item()}; the optimiser did not step, "
                    f"error.state is the iterate this step started from. Lower lr (now {lr}) or check the "
                    "data",
                    index,
                    optree.tree_map(lambda t: t.detach().clone(), theta),
                )
            opt.step()
            history.append(loss.detach())
            if collecting:
                step += 1
                if step % cycle == 0:
                    state = update(state, theta)
        if progress:
            phase = "swag" if collecting else "burn-in"
            print(
                f"epoch {done + epoch + 1}/{done + burn + epochs} ({phase}): loss {history[-1].item():.4f}, "
                f"collected {int(state.num_models)}",
                file=sys.stderr,
            )
    if int(state.num_models) == 0:
        raise ValueError(
            f"no iterate was collected: collect_every={cycle} exceeds the {epochs * steps_per_epoch} steps "
            "after burn-in; lower collect_every or raise epochs"
        )
    final = optree.tree_map(lambda t: t.detach().clone(), theta)
    hist = torch.stack(history)
    if ck is not None:
        hist = torch.cat([ck["history"], hist])
    checkpoint = {
        "format": _CHECKPOINT_FORMAT,
        "version": 1,
        "params": final,
        "optimizer": opt.state_dict(),
        "state": state,
        "step": step,
        "epochs": done + burn + epochs,
        "history": hist,
    }
    return SWAGResult(state, final, hist, checkpoint)
