"""Variational inference: the ELBO of a posterior family, a pure training step, and ``fit``.

Bayes-by-Backprop (Blundell et al. 2015, "Weight Uncertainty in Neural
Networks") trains the state of a posterior family ``q`` (e.g.
:func:`funcbnn.families.diag_gaussian`) by stochastic gradients of the negative
evidence lower bound

    -ELBO(q) = sum_n E_q[-log p(y_n | f(w, x_n))] + KL(q || p).

**Scaling convention** (the one this library uses everywhere). The loss of one
minibatch ``B`` drawn from a data set of ``N`` examples is

    loss = mean_{n in B} E_q[-log p(y_n | f(w, x_n))] + kl_weight * KL(q || p) / N,

so that averaged over the minibatches of an epoch it is ``-ELBO / N`` (for
``kl_weight = 1``), an unbiased estimate whose size does not depend on the batch
size. On a full batch ``loss * N == -ELBO`` exactly. Peers differ:
bayesian-torch averages the KL over weights (about ``1e5`` times too small on
real nets); deepuq divides it by the number of batches, i.e. multiplies ours by
the batch size.

The expected NLL is a Monte-Carlo average over ``num_samples``
reparameterised weight draws (``post.rsample``), evaluated as one vmapped
forward over the draws or as a loop over them, whichever was measured faster
for the model, input shape and sample count (see :func:`elbo`). Layers can
instead sample their pre-activations (local reparameterisation, Kingma et al.
2015): pass an ``apply_fn`` built by :func:`funcbnn.local_reparam.local_reparameterize`.

A training loop is three lines::

    state = vi.trainable(post.init(params))
    opt = torch.optim.Adam(vi.leaves(state), lr=1e-2)
    step = vi.build_step(apply_fn, post, prior, num_data=len(x_train))
    for x, y in loader:
        state, info = step(state, opt, (x, y), generator=g)   # info = (loss, nll, kl)
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from typing import Any, Callable, Iterable, Literal, NamedTuple, TextIO

import optree
import torch
import torch.nn.functional as F
from torch import Tensor

from ._batching import vmap_is_faster, vmap_leading
from ._validation import positive_int
from .families.diag_gaussian import DiagGaussian, DiagGaussianState
from .families.diag_gaussian import _analytic_kl
from .families.diag_gaussian import _check_state as _check_diag_state
from .families.diag_gaussian import kl as _diag_kl
from .families.diag_gaussian import rsample as _diag_rsample
from .likelihoods import Likelihood, get_likelihood
from .local_reparam import LocalReparamModel
from .predict import VmapFallbackWarning
from .tree import Tree

__all__ = [
    "ELBOInfo",
    "FitResult",
    "elbo",
    "expected_nll",
    "step",
    "build_step",
    "fit",
    "trainable",
    "leaves",
]

Method = Literal["auto", "vmap", "loop"]


class ELBOInfo(NamedTuple):
    """The terms of one minibatch's VI loss (see the module docstring for the scaling).

    Attributes
    ----------
    loss : Tensor
        ``nll + kl_weight * kl / num_data``; what the optimiser minimises.
    nll : Tensor
        Monte-Carlo estimate of the expected negative log-likelihood, averaged
        over the batch (nats per example).
    kl : Tensor
        ``KL(q || prior)`` of the whole posterior (nats, not divided by anything).
    """

    loss: Tensor
    nll: Tensor
    kl: Tensor


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes
    ----------
    state : Tree
        The trained state (detached leaves; pass it to :func:`trainable` to train on).
    history : ELBOInfo
        One entry per optimiser step: ``history.loss[t]``, ``history.nll[t]``,
        ``history.kl[t]`` are 1-D tensors over steps.
    """

    state: Any
    history: ELBOInfo


# ---------------------------------------------------------------------------------------------
# input checks


def _check_batch(batch: Any) -> tuple[Any, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch must be a pair (inputs, targets), got {type(batch).__name__}")
    x, y = batch
    if not isinstance(y, Tensor):
        raise TypeError(f"batch targets must be a Tensor, got {type(y).__name__}")
    if y.dim() == 0:
        raise ValueError("batch targets must have a leading batch axis, got a 0-d tensor")
    return x, y


def _check_num_data(num_data: Any, batch_size: int) -> int:
    num_data = positive_int(num_data, "num_data")
    if num_data < batch_size:
        raise ValueError(
            f"num_data (the size of the whole data set) must be at least the batch size {batch_size}, "
            f"got {num_data}"
        )
    return num_data


def _check_kl_weight(kl_weight: Any) -> float:
    try:
        value = float(kl_weight)
    except (TypeError, ValueError):
        raise TypeError(f"kl_weight must be a number, got {kl_weight!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"kl_weight must be finite and >= 0, got {kl_weight!r}")
    return value


def _check_method(method: Any) -> None:
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")


# ---------------------------------------------------------------------------------------------
# evaluating the model at many weight draws (differentiably)


def _call(apply_fn: Callable, params: Tree, x: Any, buffers: Any) -> Any:
    return apply_fn(params, x) if buffers is None else apply_fn(params, x, buffers)


def _loop(apply_fn: Callable, samples: Tree, x: Any, buffers: Any, num: int) -> Tensor:
    leaves, spec = optree.tree_flatten(samples)
    outs = [_call(apply_fn, optree.tree_unflatten(spec, [t[i] for t in leaves]), x, buffers) for i in range(num)]
    return torch.stack(outs)


def _vmapped(apply_fn: Callable, samples: Tree, x: Any, buffers: Any) -> Tensor:
    return vmap_leading(lambda p, xb: _call(apply_fn, p, xb[0], xb[1]), samples, (x, buffers), randomness="different")


# apply_fn -> {signature: use vmap?}; the measurement runs once per model, shapes and sample count.
# False also records a forward that failed under vmap (so the fallback warns once).
_PATHS: "weakref.WeakKeyDictionary[Any, dict[tuple, bool]]" = weakref.WeakKeyDictionary()


def _signature(samples: Tree, x: Any, num: int) -> tuple:
    def sig(t: Any) -> Any:
        if isinstance(t, Tensor):
            return (tuple(t.shape), t.dtype, t.device)
        try:
            hash(t)
            return t
        except TypeError:
            return ("unhashable", id(t))

    x_leaves, x_spec = optree.tree_flatten(x)
    p_leaves, p_spec = optree.tree_flatten(samples)
    return (num, torch.is_grad_enabled(), x_spec, tuple(map(sig, x_leaves)), p_spec, tuple(map(sig, p_leaves)))


def _with_backward(fn: Callable[[], Tensor], leaves: list[Tensor]) -> Callable[[], None]:
    """``fn()`` and, with autograd on, the backward pass to ``leaves``: what a training step pays."""

    def run() -> None:
        out = fn()
        if torch.is_grad_enabled():
            # allow_unused: a parameter the output does not depend on is no reason to leave vmap.
            torch.autograd.grad(out.float().sum(), leaves, allow_unused=True)

    return run


def _calibrate(apply_fn: Callable, samples: Tree, x: Any, buffers: Any, num: int) -> bool:
    """Time the vmapped and the looped evaluation (forward and, under autograd, backward); True if vmap wins.

    The draws are detached copies, so the measurement leaves no gradient anywhere.
    Best of two alternating runs after a warm-up of each, so one noisy
    measurement cannot fix a bad choice.
    """
    grad = torch.is_grad_enabled()
    copies = optree.tree_map(lambda t: t.detach().requires_grad_(grad), samples)
    leaves = optree.tree_leaves(copies)
    vmap_fn = _with_backward(lambda: _vmapped(apply_fn, copies, x, buffers), leaves)
    loop_fn = _with_backward(lambda: _loop(apply_fn, copies, x, buffers, num), leaves)
    try:
        vmap_fn()  # warm-up, and the test whether the forward runs under vmap at all
    except Exception as err:  # the forward cannot run under vmap: loop from now on
        warnings.warn(
            f"the model's forward failed under torch.func.vmap ({type(err).__name__}: {err}); "
            "evaluating the weight draws of the ELBO in a Python loop instead. Pass method='loop' to "
            "silence this warning.",
            VmapFallbackWarning,
            stacklevel=4,
        )
        return False
    loop_fn()  # warm-up
    return vmap_is_faster(vmap_fn, loop_fn)


def _sampled_outputs(
    apply_fn: Callable, samples: Tree, x: Any, buffers: Any, num: int, method: Method
) -> Tensor:
    """``(S, N, ...)`` outputs at every draw in ``samples`` (leaves with a leading axis ``S``)."""
    if num == 1:
        return _call(apply_fn, optree.tree_map(lambda t: t[0], samples), x, buffers).unsqueeze(0)
    if method == "loop":
        return _loop(apply_fn, samples, x, buffers, num)
    if method == "vmap":
        return _vmapped(apply_fn, samples, x, buffers)
    try:
        cache = _PATHS.setdefault(apply_fn, {})
    except TypeError:  # not weak-referenceable: measure every call
        cache = {}
    # Buffers are part of the key: explicit (e.g. train-mode BatchNorm) buffers can change
    # whether the forward runs under vmap at all.
    key = _signature(samples, (x, buffers), num)
    use_vmap = cache.get(key)
    if use_vmap is None:
        use_vmap = cache[key] = _calibrate(apply_fn, samples, x, buffers, num)
    if use_vmap:
        return _vmapped(apply_fn, samples, x, buffers)
    return _loop(apply_fn, samples, x, buffers, num)


def _mean_nll(lik: Likelihood, outputs: Tensor, y: Tensor, validate: bool, single: bool = False) -> Tensor:
    """Mean over draws and examples of the per-example NLL; ``outputs`` is ``(S, N, ...)`` (``(N, ...)`` if ``single``)."""
    if not isinstance(outputs, Tensor):
        raise TypeError(f"the model must return a Tensor for a likelihood, got {type(outputs).__name__}")
    if single:
        if validate:
            lik.check(outputs, y)
        return lik.nll(outputs, y).mean()
    num = outputs.shape[0]
    if validate:
        lik.check(outputs[0], y)
    if num == 1:
        return lik.nll(outputs[0], y).mean()
    flat = outputs.reshape(num * outputs.shape[1], *outputs.shape[2:])
    targets = y.expand(num, *y.shape).reshape(num * y.shape[0], *y.shape[1:])
    return lik.nll(flat, targets).mean()


# ---------------------------------------------------------------------------------------------
# the diagonal-Gaussian fast path: one softplus per leaf shared by the draws and the KL


def _is_plain_diag_gaussian(post: Any, state: Any) -> bool:
    """``post`` is the library's diagonal Gaussian (not a user's variant of it) and ``state`` fits it."""
    return (
        isinstance(post, DiagGaussian)
        and isinstance(state, DiagGaussianState)
        and post.rsample is _diag_rsample
        and post.kl is _diag_kl
    )


def _diag_std(state: DiagGaussianState) -> tuple[list[Tensor], list[Tensor], list[Tensor], Any]:
    """Flattened ``(mean, rho, std)`` leaves and the tree spec, after a cheap structure check."""
    mean, spec = optree.tree_flatten(state.mean)
    rho, rho_spec = optree.tree_flatten(state.rho)
    if rho_spec != spec or any(m.shape != r.shape for m, r in zip(mean, rho)):
        _check_diag_state(state)  # raises the detailed error
    return mean, rho, [F.softplus(r) for r in rho], spec


def _diag_draws(
    mean: list[Tensor], std: list[Tensor], spec: Any, num: int, generator: torch.Generator | None
) -> Tree:
    """``mean + std * eps`` with a leading axis ``num``; the same numbers as ``diag_gaussian.rsample``."""

    def draw(m: Tensor, s: Tensor) -> Tensor:
        eps = torch.empty((num, *m.shape), dtype=m.dtype, device=m.device).normal_(generator=generator)
        return m + s * eps

    return optree.tree_unflatten(spec, [draw(m, s) for m, s in zip(mean, std)])


def expected_nll(
    apply_fn: Callable[..., Any],
    post: Any,
    state: Any,
    batch: tuple[Any, Tensor],
    *,
    likelihood: str | Likelihood = "categorical",
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    method: Method = "auto",
    buffers: dict[str, Tensor] | None = None,
    validate: bool = True,
) -> Tensor:
    """Monte-Carlo estimate of ``mean_n E_q[-log p(y_n | f(w, x_n))]``, differentiable in ``state``.

    Parameters are as in :func:`elbo`. Returns a scalar tensor.
    """
    x, y = _check_batch(batch)
    num_samples = positive_int(num_samples, "num_samples")
    _check_method(method)
    lik = get_likelihood(likelihood)
    return _expected_nll(apply_fn, post, state, x, y, lik, num_samples, generator, method, buffers, validate, None)


def _expected_nll(
    apply_fn, post, state, x, y, lik, num_samples, generator, method, buffers, validate, diag
) -> Tensor:
    """``diag`` is ``(mean, rho, std, spec)`` from :func:`_diag_std` on the fast path, else ``None``."""
    if isinstance(apply_fn, LocalReparamModel):
        std = None if diag is None else optree.tree_unflatten(diag[3], diag[2])
        outputs = apply_fn.sample_outputs_local(state, x, num_samples, generator=generator, buffers=buffers, std=std)
    elif diag is not None and num_samples == 1:
        # One draw: no sample axis at all (the same numbers as rsample(state, 1)[0]).
        mean, _, std, spec = diag
        draws = [m + s * torch.empty_like(m).normal_(generator=generator) for m, s in zip(mean, std)]
        outputs = _call(apply_fn, optree.tree_unflatten(spec, draws), x, buffers)
        return _mean_nll(lik, outputs, y, validate, single=True)
    else:
        if diag is not None:
            samples = _diag_draws(diag[0], diag[2], diag[3], num_samples, generator)
        else:
            samples = post.rsample(state, num_samples, generator=generator)
        outputs = _sampled_outputs(apply_fn, samples, x, buffers, num_samples, method)
    return _mean_nll(lik, outputs, y, validate)


def elbo(
    apply_fn: Callable[..., Any],
    post: Any,
    state: Any,
    prior: Any,
    batch: tuple[Any, Tensor],
    num_data: int,
    *,
    likelihood: str | Likelihood = "categorical",
    num_samples: int = 1,
    kl_weight: float = 1.0,
    generator: torch.Generator | None = None,
    method: Method = "auto",
    kl_samples: int | None = None,
    buffers: dict[str, Tensor] | None = None,
    validate: bool = True,
) -> ELBOInfo:
    """The VI loss of one minibatch: ``mean NLL + kl_weight * KL / num_data`` (Blundell et al. 2015).

    Summed over the equal minibatches of an epoch and multiplied by the batch
    size, ``loss`` is the negative ELBO; on a full batch ``loss * num_data`` *is*
    the negative ELBO (for ``kl_weight=1``). See the module docstring for how
    this differs from bayesian-torch and deepuq.

    Parameters
    ----------
    apply_fn : callable
        ``apply_fn(params, x) -> outputs``, e.g. from :func:`funcbnn.functionalize`;
        or a model from :func:`funcbnn.local_reparam.local_reparameterize`, whose
        Linear and Conv layers then sample pre-activations instead of weights
        (Kingma et al. 2015; needs a diagonal-Gaussian ``state``).
    post : posterior family
        Provides ``rsample(state, S, generator=...)`` and ``kl(state, prior, ...)``,
        e.g. :func:`funcbnn.families.diag_gaussian`.
    state : pytree
        The family's state; gradients flow to its leaves.
    prior : prior
        E.g. :func:`funcbnn.priors.gaussian` (analytic KL) or
        :func:`funcbnn.priors.scale_mixture` (Monte-Carlo KL).
    batch : (inputs, targets)
        One minibatch; ``targets`` has a leading batch axis.
    num_data : int
        Size ``N`` of the whole training set (>= the batch size).
    likelihood : str or Likelihood, default "categorical"
        A name from :data:`funcbnn.likelihoods.LIKELIHOODS` (``"categorical"``,
        ``"gaussian"`` with ``sigma=1``, ``"heteroscedastic_gaussian"``,
        ``"bernoulli"``) or a built :class:`~funcbnn.likelihoods.Likelihood`
        (``likelihoods.gaussian(sigma=0.1)``).
    num_samples : int, default 1
        Reparameterised weight draws for the expected NLL.
    kl_weight : float, default 1.0
        Multiplies the KL term (KL annealing, cold posteriors); 1 is the ELBO.
    generator : torch.Generator, optional
        Source of all the randomness; the same generator state gives the same loss.
    method : {"auto", "vmap", "loop"}
        How the ``num_samples`` forwards run. ``"auto"`` measures both paths
        (forward and backward) the first time it meets a model, input shape and
        sample count, and keeps the faster; a forward that fails under ``vmap``
        makes it warn once (:class:`~funcbnn.predict.VmapFallbackWarning`) and loop.
    kl_samples : int, optional
        Draws for a Monte-Carlo KL, used only when the (family, prior) pair has
        no closed form; defaults to ``num_samples``.
    buffers : dict, optional
        Model buffers (BatchNorm statistics) passed to ``apply_fn``.
    validate : bool, default True
        Check the outputs against the targets (shapes, label range) every call.

    Returns
    -------
    ELBOInfo
        ``(loss, nll, kl)``; all three keep their autograd graph.

    Raises
    ------
    TypeError, ValueError
        On a malformed batch, a non-positive ``num_data``/``num_samples``, a
        negative ``kl_weight``, an unknown likelihood or method, or outputs that
        do not fit the targets.

    Examples
    --------
    >>> import funcbnn
    >>> from funcbnn import vi
    >>> apply_fn, params, _ = funcbnn.functionalize(torch.nn.Linear(3, 2))
    >>> post, prior = funcbnn.diag_gaussian(init_std=0.1), funcbnn.priors.gaussian(1.0)
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> info = vi.elbo(apply_fn, post, post.init(params), prior, (x, y), num_data=100)
    >>> info.loss.shape
    torch.Size([])
    """
    x, y = _check_batch(batch)
    num_data = _check_num_data(num_data, y.shape[0])
    weight = _check_kl_weight(kl_weight)
    num_samples = positive_int(num_samples, "num_samples")
    if kl_samples is not None:
        kl_samples = positive_int(kl_samples, "kl_samples")
    _check_method(method)
    lik = get_likelihood(likelihood)
    diag = _diag_std(state) if _is_plain_diag_gaussian(post, state) else None
    nll = _expected_nll(apply_fn, post, state, x, y, lik, num_samples, generator, method, buffers, validate, diag)
    if diag is not None and "gaussian" in getattr(prior, "closed_forms", ()):
        kl = _analytic_kl(diag[0], diag[2], prior, state.mean)
    else:
        kl = post.kl(state, prior, num_samples=kl_samples or num_samples, generator=generator)
    return ELBOInfo(nll + (weight / num_data) * kl, nll, kl)


# ---------------------------------------------------------------------------------------------
# training


def leaves(state: Any) -> list[Tensor]:
    """The tensor leaves of ``state``: what to hand to a ``torch.optim`` optimiser."""
    return optree.tree_leaves(state)


def trainable(state: Any) -> Any:
    """A copy of ``state`` whose leaves are fresh tensors with ``requires_grad=True``.

    The copy shares nothing with ``state``, so training it never changes the
    tensors the caller passed.
    """
    for leaf in optree.tree_leaves(state):
        if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
            got = f"dtype {leaf.dtype}" if isinstance(leaf, Tensor) else type(leaf).__name__
            raise TypeError(f"state leaves must be floating-point tensors, got {got}")
    return optree.tree_map(lambda t: t.detach().clone().requires_grad_(True), state)


def _check_trainable(state_leaves: list[Tensor]) -> None:
    for leaf in state_leaves:
        if not leaf.requires_grad:
            raise ValueError(
                "state leaves must require grad to be trained; build the state with vi.trainable(state)"
            )
        if leaf.grad_fn is not None:
            raise ValueError(
                "state leaves must be leaf tensors (no autograd history); build the state with vi.trainable(state)"
            )


def step(
    apply_fn: Callable[..., Any],
    post: Any,
    prior: Any,
    state: Any,
    optimizer: torch.optim.Optimizer,
    batch: tuple[Any, Tensor],
    num_data: int,
    *,
    generator: torch.Generator | None = None,
    likelihood: str | Likelihood = "categorical",
    num_samples: int = 1,
    kl_weight: float = 1.0,
    method: Method = "auto",
    kl_samples: int | None = None,
    buffers: dict[str, Tensor] | None = None,
    validate: bool = True,
) -> tuple[Any, ELBOInfo]:
    """One optimiser step on the VI loss of ``batch``; every argument explicit.

    Zeroes the gradients of ``state``'s leaves, computes :func:`elbo`,
    backpropagates and calls ``optimizer.step()``. Like every ``torch.optim``
    optimiser, ``optimizer`` updates the leaves it was built on in place, so the
    returned state is ``state`` itself, trained by one step (build it with
    :func:`trainable` and the optimiser on :func:`leaves` of it). Use
    :func:`build_step` to close over the arguments that do not change.

    Returns
    -------
    (state, ELBOInfo)
        The info holds detached scalars.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    state_leaves = optree.tree_leaves(state)
    _check_trainable(state_leaves)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(leaf) in held for leaf in state_leaves):
        # An optimiser built on another copy of the state would make every step a silent no-op.
        raise ValueError(
            "optimizer holds none of the state's leaves; build it from vi.leaves(state) of this state"
        )
    for leaf in state_leaves:
        leaf.grad = None
    info = elbo(
        apply_fn,
        post,
        state,
        prior,
        batch,
        num_data,
        likelihood=likelihood,
        num_samples=num_samples,
        kl_weight=kl_weight,
        generator=generator,
        method=method,
        kl_samples=kl_samples,
        buffers=buffers,
        validate=validate,
    )
    info.loss.backward()
    optimizer.step()
    return state, ELBOInfo(info.loss.detach(), info.nll.detach(), info.kl.detach())


StepFn = Callable[..., tuple[Any, ELBOInfo]]


def build_step(
    apply_fn: Callable[..., Any],
    post: Any,
    prior: Any,
    num_data: int,
    *,
    likelihood: str | Likelihood = "categorical",
    num_samples: int = 1,
    kl_weight: float = 1.0,
    method: Method = "auto",
    kl_samples: int | None = None,
    buffers: dict[str, Tensor] | None = None,
    validate: bool = True,
) -> StepFn:
    """``step(state, optimizer, batch, generator=None) -> (state, ELBOInfo)`` closing over the rest.

    The arguments are checked once here; see :func:`step` and :func:`elbo` for
    their meaning.

    Examples
    --------
    >>> import funcbnn
    >>> from funcbnn import vi
    >>> apply_fn, params, _ = funcbnn.functionalize(torch.nn.Linear(3, 2))
    >>> post = funcbnn.diag_gaussian(init_std=0.1)
    >>> state = vi.trainable(post.init(params))
    >>> opt = torch.optim.Adam(vi.leaves(state), lr=1e-2)
    >>> train_step = vi.build_step(apply_fn, post, funcbnn.priors.gaussian(1.0), num_data=100)
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> state, info = train_step(state, opt, (x, y), generator=torch.Generator().manual_seed(0))
    """
    num_data = positive_int(num_data, "num_data")
    _check_kl_weight(kl_weight)
    positive_int(num_samples, "num_samples")
    if kl_samples is not None:
        positive_int(kl_samples, "kl_samples")
    _check_method(method)
    lik = get_likelihood(likelihood)

    def train_step(
        state: Any, optimizer: torch.optim.Optimizer, batch: tuple[Any, Tensor], generator: torch.Generator | None = None
    ) -> tuple[Any, ELBOInfo]:
        return step(
            apply_fn,
            post,
            prior,
            state,
            optimizer,
            batch,
            num_data,
            generator=generator,
            likelihood=lik,
            num_samples=num_samples,
            kl_weight=kl_weight,
            method=method,
            kl_samples=kl_samples,
            buffers=buffers,
            validate=validate,
        )

    return train_step


def _epoch_batches(
    data: Any, batch_size: int | None, generator: torch.Generator | None
) -> Callable[[], Iterable[tuple[Any, Tensor]]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor):
        x, y = data
        n = y.shape[0]
        x_leaves = optree.tree_leaves(x)
        if any(not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != n for t in x_leaves):
            raise ValueError(f"data inputs must be tensors with the targets' leading size {n}")
        size = n if batch_size is None else positive_int(batch_size, "batch_size")

        def batches() -> Iterable[tuple[Any, Tensor]]:
            if size >= n:
                yield x, y
                return
            order = torch.randperm(n, generator=generator, device=generator.device if generator else "cpu")
            order = order.to(y.device)
            for i in range(0, n, size):
                idx = order[i : i + size]
                yield optree.tree_map(lambda t: t[idx], x), y[idx]

        return batches
    if batch_size is not None:
        raise ValueError("batch_size only applies when data is an (inputs, targets) pair of tensors")
    if not hasattr(data, "__iter__"):
        raise TypeError(f"data must be an (inputs, targets) pair or an iterable of batches, got {type(data).__name__}")
    if iter(data) is data:  # a one-shot iterator would be empty from the second epoch on
        batches = list(data)
        return lambda: batches
    return lambda: data


def _default_num_data(data: Any) -> int:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor):
        return data[1].shape[0]
    sampler = getattr(data, "sampler", None)
    if getattr(data, "dataset", None) is not None and hasattr(sampler, "__len__"):
        # A DataLoader over a subset (SubsetRandomSampler for a train/validation split) sees
        # len(sampler) examples, not len(dataset).
        return len(sampler)
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    raise ValueError("num_data is required when data is an iterable of batches without a sized .dataset")


def fit(
    apply_fn: Callable[..., Any],
    post: Any,
    prior: Any,
    state: Any,
    data: Any,
    *,
    epochs: int = 1,
    batch_size: int | None = None,
    num_data: int | None = None,
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
    lr: float = 1e-2,
    likelihood: str | Likelihood = "categorical",
    num_samples: int = 1,
    kl_weight: float = 1.0,
    generator: torch.Generator | None = None,
    method: Method = "auto",
    kl_samples: int | None = None,
    buffers: dict[str, Tensor] | None = None,
    progress: bool = False,
    progress_file: TextIO | None = None,
) -> FitResult:
    """Train ``state`` by Bayes-by-Backprop for ``epochs`` passes over ``data``.

    Parameters
    ----------
    apply_fn, post, prior
        As in :func:`elbo`.
    state : pytree
        Initial state; it is copied, never modified.
    data : (inputs, targets) or iterable of (inputs, targets)
        Tensors (shuffled with ``generator`` into batches of ``batch_size``;
        full batch by default) or any re-iterable of batches, such as a
        ``DataLoader``.
    epochs : int
        Passes over ``data``.
    num_data : int, optional
        Training-set size; inferred from tensors or from ``data.dataset``.
    optimizer : callable, optional
        ``optimizer(leaves) -> torch.optim.Optimizer``, e.g.
        ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)``; default
        ``Adam(lr=lr)``.
    progress : bool, default False
        Draw a one-line progress bar with the last loss terms on
        ``progress_file`` (default ``sys.stderr``) after every epoch.
    likelihood, num_samples, kl_weight, generator, method, kl_samples, buffers
        As in :func:`elbo`.

    Returns
    -------
    FitResult
        The trained state (detached) and the per-step history of ``(loss, nll, kl)``.
    """
    epochs = positive_int(epochs, "epochs")
    batches = _epoch_batches(data, batch_size, generator)
    num_data = _default_num_data(data) if num_data is None else num_data
    train_state = trainable(state)
    params = leaves(train_state)
    if optimizer is None:
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer must return a torch.optim.Optimizer, got {type(opt).__name__}")
    train_step = build_step(
        apply_fn,
        post,
        prior,
        num_data,
        likelihood=likelihood,
        num_samples=num_samples,
        kl_weight=kl_weight,
        method=method,
        kl_samples=kl_samples,
        buffers=buffers,
    )
    history: list[ELBOInfo] = []
    out = progress_file if progress_file is not None else sys.stderr
    for epoch in range(epochs):
        for batch in batches():
            train_state, info = train_step(train_state, opt, batch, generator)
            history.append(info)
        if progress and history:
            _draw_progress(out, epoch + 1, epochs, history[-1])
    if progress:
        out.write("\n")
        out.flush()
    if history:
        stacked = ELBOInfo(*(torch.stack(terms) for terms in zip(*history)))
    else:
        empty = torch.zeros(0)
        stacked = ELBOInfo(empty, empty, empty)
    return FitResult(optree.tree_map(lambda t: t.detach(), train_state), stacked)


def _draw_progress(out: TextIO, done: int, total: int, info: ELBOInfo, width: int = 24) -> None:
    filled = round(width * done / total)
    bar = "#" * filled + "-" * (width - filled)
    out.write(
        f"\r[{bar}] epoch {done}/{total}  loss {float(info.loss):.4g}  "
        f"nll {float(info.nll):.4g}  kl {float(info.kl):.4g}"
    )
    out.flush()

