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

**What VI asks of a family** (the protocol of :mod:`funcbnn.families.base`,
nothing else): ``kl`` and reparameterised draws, either the declared fused
capability ``sample_and_kl`` (draws and KL in one pass sharing intermediates;
:func:`~funcbnn.families.diag_gaussian` computes one softplus per leaf for
both) or ``rsample``. Local reparameterisation (Kingma et al. 2015, an
``apply_fn`` built by :func:`funcbnn.local_reparam.local_reparameterize`) also
needs the capabilities ``mean`` and ``variance`` (or the diagonal family's
extras ``std``, or ``moments_and_kl`` which shares one softplus with the KL).

The expected NLL is a Monte-Carlo average over ``num_samples`` reparameterised
weight draws, evaluated by the library's one engine (``funcbnn._engine``) as
one vmapped forward over the draws or as a loop over them, whichever measured
faster for the model, input shape and sample count, backward pass included
(see :func:`elbo`). One draw skips the sample axis altogether.

A training loop is three lines::

    state = vi.trainable(post.init(params))
    opt = torch.optim.Adam(vi.param_groups(state), lr=1e-2)
    step = vi.build_step(apply_fn, post, prior, num_data=len(x_train))
    for x, y in loader:
        state, info = step(state, opt, (x, y), generator=g)   # info = (loss, nll, kl)
"""

from __future__ import annotations

import contextlib
import math
import sys
import weakref
from typing import Any, Callable, Iterable, Iterator, Literal, NamedTuple, Sequence, TextIO

import optree
import torch
from torch import Tensor

from . import distributed, likelihoods
from ._checkpoint import checkpoint_of, generator_state, load_optimizer, resumed_generator, same_layout
from ._engine import apply_samples
from .checks import (
    DivergedError,
    ModelInputError,
    check_finite,
    check_generator,
    describe,
    finite_checks_enabled,
    guarded_call,
    model_input_error,
)
from ._validation import positive_float, positive_int
from .families.base import capabilities, check_family, require
from .likelihoods import Likelihood, get_likelihood
from .local_reparam import LocalReparamModel
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
    "param_groups",
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
        ``history.kl[t]`` are 1-D tensors over steps (of every run a resumed
        fit continues, so it equals the history of one uninterrupted run).
    checkpoint : dict or None
        Everything :func:`fit` needs to continue bit-identically
        (``fit(..., resume=result)``): the state, the optimiser's
        ``state_dict``, the generator's state, the epochs done, the history and
        a learned noise scale. Plain tensors, dicts and lists, so
        ``torch.load`` with ``weights_only=True`` reads it. It holds the
        optimiser's moments (Adam: twice the state's size); save
        ``result._replace(checkpoint=None)`` to keep only the posterior.
    sigma : Tensor or None
        The learned observation-noise std of ``fit(..., noise="learn")`` (0-d,
        detached); ``None`` when the noise was not learned.
    """

    state: Any
    history: ELBOInfo
    checkpoint: dict | None = None
    sigma: Tensor | None = None


# A saved FitResult (its history and checkpoint included) loads with plain torch.load (weights_only=True).
torch.serialization.add_safe_globals([ELBOInfo, FitResult])

# ---------------------------------------------------------------------------------------------
# input checks


def _check_batch(batch: Any, where: str = "batch") -> tuple[Any, Tensor]:
    if isinstance(batch, dict):
        # A dict batch (a Hugging Face style collate) has no order that says which entry is the target.
        raise TypeError(
            f"{where} must be a pair (inputs, targets), got a dict with keys {sorted(map(str, batch))}; "
            "yield (inputs, targets) pairs instead, e.g. a DataLoader collate_fn returning (b['x'], b['y'])"
        )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise TypeError(f"{where} must be a pair (inputs, targets), got {type(batch).__name__}{size}")
    x, y = batch
    if not isinstance(y, Tensor):
        raise TypeError(f"{where} targets must be a Tensor, got {type(y).__name__}")
    if y.dim() == 0:
        raise ValueError(f"{where} targets must have a leading batch axis, got a 0-d tensor")
    if y.shape[0] == 0:
        raise ValueError(
            f"{where} holds no examples (targets of shape {tuple(y.shape)}): a batch needs at least one"
        )
    return x, y


def _check_num_data(num_data: Any, batch_size: int) -> int:
    num_data = positive_int(num_data, "num_data")
    if num_data < batch_size:
        raise ValueError(
            f"num_data (the size of the whole data set) must be at least the batch size {batch_size}, "
            f"got {num_data}"
        )
    return num_data


def _check_kl_weight(kl_weight: Any) -> float | Tensor:
    """``kl_weight`` as a float, or as a 0-d tensor (a view, so gradients reach it) if it is one.

    Python numbers, 0-d and shape-``(1,)`` tensors are accepted; it must be finite and ``>= 0``.
    """
    if isinstance(kl_weight, Tensor):
        if kl_weight.numel() != 1 or kl_weight.dim() > 1:
            raise ValueError(
                f"kl_weight must be a scalar (a number, a 0-d or a shape-(1,) tensor), got shape "
                f"{tuple(kl_weight.shape)}"
            )
        if kl_weight.dtype == torch.bool or kl_weight.is_complex():
            raise TypeError(f"kl_weight must be a real number, got a tensor of dtype {kl_weight.dtype}")
        value = float(kl_weight.detach())
        weight: float | Tensor = kl_weight.reshape(())
    else:
        if isinstance(kl_weight, bool):
            raise TypeError(f"kl_weight must be a number, got {kl_weight!r}")
        try:
            value = weight = float(kl_weight)
        except (TypeError, ValueError):
            raise TypeError(f"kl_weight must be a number, got {kl_weight!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"kl_weight must be finite and >= 0, got {value!r}")
    return weight


def _check_method(method: Any) -> None:
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")


# ---------------------------------------------------------------------------------------------
# evaluating the model at many weight draws (differentiably)


def _call(apply_fn: Callable, params: Tree, x: Any, buffers: Any) -> Any:
    return apply_fn(params, x) if buffers is None else apply_fn(params, x, buffers)


def _sampled_outputs(
    apply_fn: Callable,
    samples: Tree,
    x: Any,
    buffers: Any,
    num: int,
    method: Method,
    backward_to: Sequence[Tensor] | None = None,
    redraw: Callable[[], Tree] | None = None,
) -> Tensor:
    """``(S, N, ...)`` outputs at every draw in ``samples`` (leaves with a leading axis ``S``), by the engine.

    ``backward_to``: the tensors the caller's loss will be differentiated to (the
    state), so that ``"auto"`` times the backward pass too; by default, under
    autograd, the samples themselves. ``redraw``: fresh draws for that timing
    (see :func:`funcbnn._engine.apply_samples`).
    """
    if num == 1:
        out = _guarded(apply_fn, optree.tree_map(lambda t: t[0], samples), x, buffers)
        if not isinstance(out, Tensor):
            raise _not_a_tensor(out)
        return out.unsqueeze(0)
    if backward_to is None and torch.is_grad_enabled():
        backward_to = [t for t in optree.tree_leaves(samples) if t.requires_grad]
    try:
        # Inputs the model cannot take fail the engine's first-sample probe with a ValueError that
        # names them; a failure after that (a forced "vmap" that cannot run) is the model's own.
        return apply_samples(
            apply_fn,
            samples,
            x,
            args=() if buffers is None else (buffers,),
            method=method,
            backward_to=backward_to,
            redraw=redraw,
        )
    except ModelInputError as e:
        # The engine's first-sample probe failed with a torch error: name the batch inputs, as
        # every fitter does.
        raise model_input_error(e.__cause__ or e, x, samples, "the batch inputs", "vi") from (e.__cause__ or e)
    except TypeError as e:
        # The engine stacks any tree of tensors, and stops at a non-tensor leaf (a tuple
        # (logits, aux_int)): say what the likelihood needs instead of what the engine needs.
        if "must return tensors" in str(e):
            first = _guarded(apply_fn, optree.tree_map(lambda t: t[0], samples), x, buffers)
            raise _not_a_tensor(first) from e
        raise


def _guarded(apply_fn: Callable, params: Tree, x: Any, buffers: Any) -> Any:
    """``apply_fn`` on ``x``; a torch error from the model becomes a ValueError naming the batch inputs."""
    with guarded_call(x, params, "the batch inputs", "vi"), _short_batch_hint(x):
        return _call(apply_fn, params, x, buffers)


@contextlib.contextmanager
def _short_batch_hint(x: Any) -> Iterator[None]:
    """A train-mode BatchNorm refuses a batch of one example (a DataLoader's last, short batch):
    say which batch and what to do, not only torch's "Expected more than 1 value per channel"."""
    try:
        yield
    except ValueError as e:
        if "more than 1 value per channel" not in str(e):
            raise
        raise ValueError(
            f"the batch inputs ({describe(x)}) are too few for a train-mode BatchNorm, which needs at least "
            "2 examples per batch: drop the short last batch (DataLoader(..., drop_last=True)) or put the "
            f"normalisation layers in eval mode. Torch said: {e}"
        ) from e


def _not_a_tensor(outputs: Any) -> TypeError:
    """The error for a model whose output is not the one tensor a likelihood scores, with the fix."""
    if isinstance(outputs, dict):
        got, pick = f"a dict with keys {sorted(map(str, outputs))}", "[\"logits\"]"
    elif isinstance(outputs, (tuple, list)):
        got, pick = f"a {type(outputs).__name__} of {len(outputs)}", "[0]"
    else:
        got, pick = type(outputs).__name__, ""
    return TypeError(
        f"the model must return one Tensor (what the likelihood scores), got {got}; wrap it to return "
        f"that tensor, e.g. apply_fn=lambda params, x: model_fn(params, x){pick}"
    )


def _mean_nll(lik: Likelihood, outputs: Tensor, y: Tensor, validate: bool, single: bool = False) -> Tensor:
    """Mean over draws and examples of the per-example NLL; ``outputs`` is ``(S, N, ...)`` (``(N, ...)`` if ``single``)."""
    if not isinstance(outputs, Tensor):
        raise _not_a_tensor(outputs)
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


def _trained_leaves(state: Any) -> list[Tensor]:
    """The state's leaves a backward pass will reach (what the path timing differentiates to)."""
    return [t for t in optree.tree_leaves(state) if isinstance(t, Tensor) and t.requires_grad]


def _local_moments(post: Any, state: Any) -> tuple[Tree, Tree]:
    """Mean and std trees of a diagonal state, through the family's declared capabilities."""
    mean = require(post, "mean", "local reparameterisation")(state)
    std_fn = getattr(post, "std", None)
    if callable(std_fn):  # the diagonal family's own std: one softplus, no square and root
        return mean, std_fn(state)
    variance = require(post, "variance", "local reparameterisation")(state)
    return mean, optree.tree_map(torch.sqrt, variance)


def _with_seeds(apply_fn: Callable, draws: Tree, num_samples: int | None, generator: torch.Generator | None) -> Any:
    """Pair the weight draws with random-layer seeds from ``generator`` where the model takes them
    (:class:`funcbnn.mc_dropout.DropoutModel`), so its dropout masks are reproducible too."""
    seeded = getattr(apply_fn, "with_seeds", None)
    return draws if seeded is None else seeded(draws, num_samples, generator)


def _timing_draws(apply_fn: Callable, draw: Callable[[torch.Generator], Tree], like: Tree) -> Callable[[], Tree]:
    """Fresh draws for the engine's path timing, made as the real ones but from a private generator
    (the caller's stays untouched), so the timing includes what drawing costs each path."""

    def redraw() -> Tree:  # built only if the engine times (once per signature), not every call
        leaves = [t for t in optree.tree_leaves(like) if isinstance(t, Tensor)]
        private = torch.Generator(device=leaves[0].device).manual_seed(0)
        return _with_seeds(apply_fn, draw(private), leaves[0].shape[0], private)

    return redraw


class _Terms(NamedTuple):
    nll: Tensor
    kl: Tensor | None


def _nll_and_kl(
    apply_fn, post, state, prior, x, y, lik, num_samples, generator, method, buffers, validate, kl_samples
) -> _Terms:
    """The Monte-Carlo NLL and, if ``prior`` is given, the KL, drawing from ``generator`` in one fixed order:
    the weight draws (or the local layers' noise) first, then any Monte-Carlo KL draws."""
    want_kl = prior is not None
    kl_draws = kl_samples or num_samples
    if isinstance(apply_fn, LocalReparamModel):
        # The diagonal family's extra moments_and_kl shares one softplus between the moments
        # and an analytic KL (10% of a 784-512-512-10 step); other families go through the
        # declared mean/variance and kl.
        fused = getattr(post, "moments_and_kl", None)
        if want_kl and callable(fused):
            mean, std, kl = fused(state, prior)
        else:
            (mean, std), kl = _local_moments(post, state), None
        # (inputs the model cannot take: a ValueError from sample_outputs_local itself)
        outputs = apply_fn.sample_outputs_local(
            state, x, num_samples, generator=generator, buffers=buffers, mean=mean, std=std
        )
        nll = _mean_nll(lik, outputs, y, validate)
        if want_kl and kl is None:  # after the forward's noise: any Monte-Carlo KL draws come last
            kl = post.kl(state, prior, num_samples=kl_draws, generator=generator)
        return _Terms(nll, kl)
    if want_kl and "sample_and_kl" in capabilities(post):
        # One pass for draws and KL; with one draw no sample axis at all.
        draws, kl = post.sample_and_kl(
            state, prior, None if num_samples == 1 else num_samples, generator=generator, kl_samples=kl_draws
        )
        if num_samples == 1:
            draws = _with_seeds(apply_fn, draws, None, generator)
            return _Terms(_mean_nll(lik, _guarded(apply_fn, draws, x, buffers), y, validate, single=True), kl)
        draw = lambda g: post.sample_and_kl(state, prior, num_samples, generator=g, kl_samples=kl_draws)[0]  # noqa: E731
    else:
        rsample = require(post, "rsample", "vi")
        draws, kl = rsample(state, num_samples, generator=generator), None
        draw = lambda g: rsample(state, num_samples, generator=g)  # noqa: E731
    draws = _with_seeds(apply_fn, draws, num_samples, generator)
    outputs = _sampled_outputs(
        apply_fn, draws, x, buffers, num_samples, method, _trained_leaves(state), _timing_draws(apply_fn, draw, draws)
    )
    nll = _mean_nll(lik, outputs, y, validate)
    if want_kl and kl is None:
        kl = post.kl(state, prior, num_samples=kl_draws, generator=generator)
    return _Terms(nll, kl)


def _check_state_and_prior(apply_fn: Any, state: Any, prior: Any, order: str) -> None:
    """Catch the easy argument mix-ups early: params for the state, a prior and a state swapped.

    ``order`` is the caller's signature, which the message quotes (``elbo`` and
    ``fit`` order ``state`` and ``prior`` differently, a known trap).
    """
    def kind(obj: Any) -> str | None:
        module = type(obj).__module__
        if module.startswith("funcbnn.priors"):
            return "prior"
        if module.startswith("funcbnn.families") or module.startswith("funcbnn.laplace"):
            return "state"
        return None

    if kind(state) == "prior" or (prior is not None and kind(prior) == "state"):
        raise TypeError(
            f"state and prior look swapped (state is a {type(state).__name__}, prior a {type(prior).__name__}); "
            f"the order is {order}"
        )
    template = getattr(apply_fn, "params_template", None)
    if isinstance(state, dict) and isinstance(template, dict) and state.keys() == template.keys():
        raise TypeError(
            "state is the model's parameter tree, not a posterior state: pass post.init(params) "
            f"(the order is {order})"
        )


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

    Parameters are as in :func:`elbo`; the family needs ``rsample`` (or, for a
    locally reparameterised ``apply_fn``, ``mean`` and ``variance``). Returns a
    scalar tensor; for the same generator state it equals ``elbo(...).nll``.

    Examples
    --------
    >>> import funcbnn
    >>> apply_fn, params, _ = funcbnn.functionalize(torch.nn.Linear(3, 2))
    >>> post = funcbnn.diag_gaussian(init_std=0.1)
    >>> batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    >>> expected_nll(apply_fn, post, post.init(params), batch, likelihood="classification").shape
    torch.Size([])
    """
    x, y = _check_batch(batch)
    num_samples = positive_int(num_samples, "num_samples")
    _check_method(method)
    check_generator(generator)
    check_family(post, "post")
    lik = get_likelihood(likelihood)
    return _nll_and_kl(
        apply_fn, post, state, None, x, y, lik, num_samples, generator, method, buffers, validate, None
    ).nll


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
    kl_weight: float | Tensor = 1.0,
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
        (Kingma et al. 2015; needs a family declaring ``mean`` and ``variance``).
    post : posterior family
        Any family of :mod:`funcbnn.families` with ``kl`` and either the fused
        ``sample_and_kl`` capability (used when declared) or ``rsample``, e.g.
        :func:`funcbnn.families.diag_gaussian`.
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
        A name from :data:`funcbnn.likelihoods.LIKELIHOODS` or its alias
        (``"categorical"``/``"classification"``, ``"gaussian"``/``"regression"``
        with ``sigma=1``, ``"heteroscedastic_gaussian"``/``"heteroscedastic_regression"``,
        ``"bernoulli"``/``"binary"``) or a built
        :class:`~funcbnn.likelihoods.Likelihood` (``likelihoods.gaussian(sigma=0.1)``).
    num_samples : int, default 1
        Reparameterised weight draws for the expected NLL.
    kl_weight : float or Tensor, default 1.0
        Multiplies the KL term (KL annealing, cold posteriors); 1 is the ELBO.
        A Python number, a 0-d or a shape-``(1,)`` tensor (gradients flow to a
        tensor); finite and ``>= 0``.
    generator : torch.Generator, optional
        Source of all the randomness; the same generator state gives the same
        loss. Draws come first, then any Monte-Carlo KL draws; the path timing
        of ``method="auto"`` draws nothing.
    method : {"auto", "vmap", "loop"}
        How the ``num_samples`` forwards run. ``"auto"`` measures both paths
        (forward and backward to ``state``) the first time it meets a model,
        input shape and sample count, and keeps the faster; both give the same
        numbers up to float rounding. A forward that fails under ``vmap``
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
        negative ``kl_weight``, an unknown likelihood or method, a family
        without the capabilities above, or outputs that do not fit the targets.

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
    check_generator(generator)
    check_family(post, "post")
    _check_state_and_prior(apply_fn, state, prior, "elbo(apply_fn, post, state, prior, batch, num_data)")
    lik = get_likelihood(likelihood)
    nll, kl = _nll_and_kl(
        apply_fn, post, state, prior, x, y, lik, num_samples, generator, method, buffers, validate, kl_samples
    )
    return ELBOInfo(nll + (weight / num_data) * kl, nll, kl)


# ---------------------------------------------------------------------------------------------
# training


def leaves(state: Any) -> list[Tensor]:
    """The tensor leaves of ``state``: what to hand to a ``torch.optim`` optimiser."""
    return optree.tree_leaves(state)


def param_groups(state: Any) -> list[dict[str, Any]]:
    """``torch.optim`` parameter groups of ``state``, one per field of its ``NamedTuple``, named after it.

    For a :class:`~funcbnn.families.DiagGaussianState` that is
    ``[{"params": [...], "name": "mean"}, {"params": [...], "name": "rho"}]``, so
    means and scales can get different learning rates; a state that is not a
    ``NamedTuple`` gives one group named ``"state"``. Fields without tensors are
    left out. Every ``torch.optim`` optimiser takes the list as it is (the
    ``name`` key is kept in ``optimizer.param_groups``).

    Examples
    --------
    >>> import funcbnn
    >>> post = funcbnn.diag_gaussian(init_std=0.1)
    >>> state = trainable(post.init({"w": torch.zeros(3, 2)}))
    >>> groups = param_groups(state)
    >>> [g["name"] for g in groups]
    ['mean', 'rho']
    >>> for g in groups:
    ...     g["lr"] = 1e-2 if g["name"] == "mean" else 1e-3
    >>> opt = torch.optim.Adam(groups)
    """
    fields = getattr(type(state), "_fields", None)
    if isinstance(state, tuple) and fields:
        parts = [(name, optree.tree_leaves(value)) for name, value in zip(fields, state)]
    else:
        parts = [("state", optree.tree_leaves(state))]
    return [
        {"params": [t for t in part if isinstance(t, Tensor)], "name": name}
        for name, part in parts
        if any(isinstance(t, Tensor) for t in part)
    ]


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
                "state leaves must be leaf tensors (no autograd history); build the state with "
                "vi.trainable(state)"
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
    kl_weight: float | Tensor = 1.0,
    method: Method = "auto",
    kl_samples: int | None = None,
    buffers: dict[str, Tensor] | None = None,
    validate: bool = True,
    process_group: Any = None,
) -> tuple[Any, ELBOInfo]:
    """One optimiser step on the VI loss of ``batch``; every argument explicit.

    Zeroes the gradients of ``state``'s leaves, computes :func:`elbo`,
    backpropagates and calls ``optimizer.step()``. Like every ``torch.optim``
    optimiser, ``optimizer`` updates the leaves it was built on in place, so the
    returned state is ``state`` itself, trained by one step (build it with
    :func:`trainable` and the optimiser on :func:`leaves` of it). Use
    :func:`build_step` to close over the arguments that do not change.

    All gradients the optimiser holds are zeroed first (not only the state's),
    so a learned hyperparameter in the same optimiser (a noise scale) does not
    accumulate gradients across steps.

    With ``process_group`` (data-parallel VI): ``batch`` is this rank's share
    of the global batch (non-empty; sizes may differ), ``num_data`` the size of
    the whole data set, ``generator`` in the same state on every rank (so all
    ranks draw the same weights). Gradients are averaged weighted by the
    ranks' batch sizes, like DDP, so the step equals one process's step on the
    concatenated batch, and the info holds the global loss terms.

    Non-finite values are caught before they reach the state (each check one
    host sync; :func:`funcbnn.checks.set_finite_checks` turns them off): NaN or
    inf in the batch raise :class:`~funcbnn.checks.NonFiniteError`, and a
    non-finite loss raises :class:`~funcbnn.checks.DivergedError` *before* the
    optimiser steps, with ``error.state`` a copy of the state this step started
    from (``error.step`` is 0, this call; :func:`fit` counts over the run).

    Returns
    -------
    (state, ELBOInfo)
        The info holds detached scalars.
    """
    check_generator(generator)
    return _step(
        apply_fn, post, prior, state, optimizer, batch, num_data, generator=generator, likelihood=likelihood,
        num_samples=num_samples, kl_weight=kl_weight, method=method, kl_samples=kl_samples, buffers=buffers,
        validate=validate, process_group=process_group, check_data=True,
    )


# Computed noise scales (tensors with a graph) that a step has backpropagated through; weak, so none is kept alive.
# Keyed by id (a WeakSet would compare tensors with ==).
_SIGMAS_STEPPED: "weakref.WeakValueDictionary[int, Tensor]" = weakref.WeakValueDictionary()


def _step(
    apply_fn: Callable[..., Any],
    post: Any,
    prior: Any,
    state: Any,
    optimizer: torch.optim.Optimizer,
    batch: tuple[Any, Tensor],
    num_data: int,
    *,
    generator: torch.Generator | None,
    likelihood: str | Likelihood,
    num_samples: int,
    kl_weight: float | Tensor,
    method: Method,
    kl_samples: int | None,
    buffers: dict[str, Tensor] | None,
    validate: bool,
    process_group: Any,
    check_data: bool,
) -> tuple[Any, ELBOInfo]:
    """:func:`step`; ``check_data=False`` for :func:`fit`, which checks each batch itself (naming it)."""
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
    # Every gradient the optimiser holds (a learned noise scale too) and every state leaf's: what
    # optimizer.zero_grad(set_to_none=True) does, without its profiler hooks (8 us, 1% of a small step).
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    for leaf in state_leaves:
        leaf.grad = None
    sigma = getattr(likelihood, "sigma", None)
    if isinstance(sigma, Tensor) and sigma.grad_fn is not None:
        # A sigma computed once (gaussian(sigma=log_s.exp())) and reused: the first step's backward
        # freed its graph, and the second would fail deep in autograd.
        if _SIGMAS_STEPPED.get(id(sigma)) is sigma:
            raise ValueError(
                "the likelihood's sigma was computed from a tensor (e.g. gaussian(sigma=log_s.exp())) and its "
                "graph was used up by an earlier step. Rebuild the likelihood every step, use "
                "likelihoods.learnable_gaussian(log_s), which reads log_s at every call, or vi.fit(..., noise='learn')"
            )
        _SIGMAS_STEPPED[id(sigma)] = sigma
    if check_data:
        x, y = _check_batch(batch)
        check_finite(x, "batch inputs")
        check_finite(y, "batch targets")
    if process_group is not None:
        local = _check_batch(batch)[1].shape[0]
        counts = distributed.all_reduce_tree(torch.tensor([float(local), float(local == 0)]), process_group)
        if counts[1] > 0:
            raise ValueError(
                f"{int(counts[1])} rank(s) have an empty batch; data-parallel VI needs a non-empty share of "
                "every global batch on every rank (the ranks must draw the same weights)"
            )
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
    if process_group is not None:
        weight = local / float(counts[0])  # this rank's share of the global batch
        trained = [t for t in state_leaves if t.grad is not None]
        summed = distributed.all_reduce_tree([t.grad * weight for t in trained], process_group)
        for t, g in zip(trained, summed):
            t.grad = g
        terms = distributed.all_reduce_tree(torch.stack([info.loss.detach(), info.nll.detach()]) * weight, process_group)
        info = ELBOInfo(terms[0], terms[1], info.kl)
    # One host sync per step, before the optimiser can write a non-finite update into the state
    # (after the all-reduce with a process group, so that every rank decides alike).
    if finite_checks_enabled() and not math.isfinite(info.loss.detach().item()):
        raise DivergedError(
            f"the VI loss became {float(info.loss.detach())} (nll {float(info.nll.detach())}, kl "
            f"{float(info.kl.detach())}); the optimiser did "
            "not step, error.state is the state this step started from. Lower the learning rate, or check "
            "the data "
            "and the initial state",
            0,
            optree.tree_map(lambda t: t.detach().clone(), state),
        )
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
    kl_weight: float | Tensor = 1.0,
    method: Method = "auto",
    kl_samples: int | None = None,
    buffers: dict[str, Tensor] | None = None,
    validate: bool = True,
    process_group: Any = None,
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
            process_group=process_group,
        )

    return train_step


def _epoch_batches(
    data: Any, batch_size: int | None, generator: torch.Generator | None
) -> Callable[[], Iterable[tuple[Any, Tensor]]]:
    if _is_tensor_pair(data):
        # detached: a data tensor that requires grad would collect every step's gradient in its .grad
        x, y = optree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tuple(data))
        n = y.shape[0] if y.dim() else 0
        # Non-tensor leaves (an Inputs' flags and scales) pass through; every tensor is batched.
        x_tensors = [t for t in optree.tree_leaves(x) if isinstance(t, Tensor)]
        if not x_tensors or any(t.dim() == 0 or t.shape[0] != n for t in x_tensors):
            raise ValueError(
                f"data inputs must be tensors with the targets' leading size {n}, got {describe(x)} "
                f"and targets {describe(y)}"
            )
        if n == 0:
            raise ValueError(
                f"data holds no examples (targets of shape {tuple(y.shape)}): fit needs at least one"
            )
        # Once for the whole data set (one sync), not once per batch.
        check_finite(x, "data inputs")
        check_finite(y, "data targets")
        size = n if batch_size is None else positive_int(batch_size, "batch_size")

        def batches() -> Iterable[tuple[Any, Tensor]]:
            if size >= n:
                yield x, y
                return
            order = torch.randperm(n, generator=generator, device=generator.device if generator else "cpu")
            order = order.to(y.device)
            for i in range(0, n, size):
                idx = order[i : i + size]
                yield optree.tree_map(lambda t: t[idx] if isinstance(t, Tensor) else t, x), y[idx]

        return batches
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data):
        raise TypeError(
            f"data must be an (inputs, targets) pair of tensors or an iterable of such batches, got a "
            f"{type(data).__name__} of {len(data)} tensors"
        )
    if batch_size is not None:
        raise ValueError("batch_size only applies when data is an (inputs, targets) pair of tensors")
    if isinstance(data, (Tensor, dict, str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(
            "data must be an (inputs, targets) pair of tensors or an iterable of such batches, got "
            f"{describe(data)}"
        )
    if hasattr(data, "__len__") and len(data) == 0:
        raise ValueError(
            "data yielded no batches (it is empty): fit needs at least one (inputs, targets) batch"
        )
    if iter(data) is data:  # a one-shot iterator would be empty from the second epoch on
        batches = list(data)
        return lambda: batches
    return lambda: data


def _is_tensor_pair(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def _default_num_data(data: Any, batches: Callable[[], Iterable[Any]]) -> int:
    if _is_tensor_pair(data):
        return data[1].shape[0]
    sampler = getattr(data, "sampler", None)
    if getattr(data, "dataset", None) is not None and hasattr(sampler, "__len__"):
        # A DataLoader over a subset (SubsetRandomSampler for a train/validation split) sees
        # len(sampler) examples, not len(dataset).
        return len(sampler)
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    held = batches()
    if isinstance(held, (list, tuple)):
        # A list of batches (or a one-shot iterator, materialised): every example is in it once.
        return sum(_check_batch(b, f"data batch {i}")[1].shape[0] for i, b in enumerate(held))
    raise ValueError("num_data is required when data is an iterable of batches without a sized .dataset")


# ---------------------------------------------------------------------------------------------
# checkpoints

_CHECKPOINT_FORMAT = "funcbnn.vi.fit"


def _learned_noise(lik: Likelihood, noise: Any, ck: dict | None) -> Tensor | None:
    """The trainable log-std of ``noise="learn"`` (from the checkpoint when resuming), or None."""
    if noise not in ("fixed", "learn"):
        raise ValueError(f"noise must be 'fixed' or 'learn', got {noise!r}")
    if noise == "fixed":
        if isinstance(lik.sigma, Tensor) and lik.sigma.requires_grad:
            # fit's optimiser would not hold it: its gradient would pile up over the steps, unused.
            raise ValueError(
                "the likelihood's sigma is a tensor that requires grad, but fit does not train it; "
                "pass noise='learn' to learn the noise std (type-II maximum likelihood), or a plain number"
            )
        if ck is not None and ck.get("log_sigma") is not None:
            raise ValueError(
                "resume: the checkpoint learned the noise std; pass noise='learn' to continue it"
            )
        return None
    if lik.name != "gaussian":
        raise ValueError(
            "noise='learn' learns the std of a Gaussian likelihood ('regression'), got likelihood "
            f"'{lik.name}'"
        )
    if ck is not None:
        if ck.get("log_sigma") is None:
            raise ValueError("resume: the checkpoint did not learn the noise std; pass noise='fixed'")
        start = ck["log_sigma"]
    else:
        sigma = lik.sigma.detach() if isinstance(lik.sigma, Tensor) else torch.tensor(float(lik.sigma))
        start = sigma.log()
    return start.detach().clone().reshape(()).requires_grad_(True)


def _preflight(
    apply_fn: Callable, post: Any, state: Any, x: Any, y: Tensor, lik: Likelihood, buffers: Any
) -> None:
    """One forward at one draw from a private generator (the caller's stays untouched), before the engine
    sees the model: inputs it cannot take, outputs that are not a tensor and targets that do not fit the
    likelihood get fit's own errors, not the engine's vmap-fallback warning followed by a torch error."""
    private = torch.Generator(device=optree.tree_leaves(state)[0].device).manual_seed(0)
    with torch.no_grad():
        draw = optree.tree_map(lambda t: t[0], post.sample(state, 1, generator=private))
        out = _guarded(apply_fn, _with_seeds(apply_fn, draw, None, private), x, buffers)
    if not isinstance(out, Tensor):
        raise _not_a_tensor(out)
    lik.check(out, y)


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
    optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None = None,
    lr: float = 1e-2,
    likelihood: str | Likelihood = "categorical",
    noise: Literal["fixed", "learn"] = "fixed",
    num_samples: int = 1,
    kl_weight: float | Tensor = 1.0,
    generator: torch.Generator | None = None,
    method: Method = "auto",
    kl_samples: int | None = None,
    buffers: dict[str, Tensor] | None = None,
    resume: FitResult | dict | None = None,
    progress: bool = False,
    progress_file: TextIO | None = None,
    process_group: Any = None,
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
        ``DataLoader`` (``drop_last`` as you like: a short last batch is one
        more step with the same scaling).
    epochs : int
        Passes over ``data`` (in this call; a resumed fit runs ``epochs`` more).
    num_data : int, optional
        Training-set size; inferred from tensors, from ``data.dataset``, or by
        counting the examples of a list of batches (or of a one-shot iterator).
    optimizer : callable, optional
        ``optimizer(groups) -> torch.optim.Optimizer``, called with
        :func:`param_groups` of the state: one named group per state field
        (``"mean"`` and ``"rho"`` for a diagonal Gaussian, plus ``"noise"``
        with ``noise="learn"``), e.g.
        ``functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)``. Set a
        group's own ``"lr"`` to train means and scales at different rates (see
        the example). Default ``Adam(groups, lr=lr)``.
    noise : {"fixed", "learn"}, default "fixed"
        ``"learn"`` trains the observation-noise std of a Gaussian likelihood
        with the state, by the same ELBO (type-II maximum likelihood of
        ``sigma``): its log, starting at the likelihood's ``sigma``
        (``likelihoods.gaussian(sigma=0.5)``; 1 for ``"regression"``), is the
        optimiser group ``"noise"``; the learned std is ``result.sigma``.
    resume : FitResult or dict, optional
        A result of an earlier ``fit`` (or its ``.checkpoint``, also after
        ``torch.save``/``torch.load``): training continues from its state,
        optimiser state, generator state and history, so ``fit(epochs=2)``
        then ``fit(epochs=2, resume=...)`` gives the state and history of
        ``fit(epochs=4)`` bit for bit. ``state`` must be shaped like the
        checkpoint's (e.g. the initial state) and is not used otherwise; the
        other arguments must be the ones of the first run. ``generator`` (a new
        one if None) is set to the saved state. Bit-identity needs randomness
        that the checkpoint holds: a ``generator`` (not the global RNG), data
        as tensors (a ``DataLoader`` shuffles by its own RNG), and a fixed
        engine path: ``num_samples=1``, or ``method="vmap"``/``"loop"`` (with
        ``"auto"`` and several draws the engine times the two paths, which
        agree only to float rounding, and the resumed process may pick the
        other).
    progress : bool, default False
        Draw a one-line progress bar with the last loss terms on
        ``progress_file`` (default ``sys.stderr``) after every epoch.
    likelihood, num_samples, kl_weight, generator, method, kl_samples, buffers
        As in :func:`elbo` (a tensor ``kl_weight`` is used detached: fit trains
        the state, and would otherwise accumulate its gradient in the caller's
        tensor).
    process_group : torch.distributed group, optional
        Data-parallel VI (see :func:`step`): ``data`` is this rank's shard, as an
        iterable of batches or as tensors without ``batch_size`` (one batch);
        every rank the same number of batches per epoch and the same
        ``generator`` state; ``num_data`` defaults to the sum of the shards.

    Returns
    -------
    FitResult
        The trained state (detached), the per-step history of ``(loss, nll, kl)``,
        the checkpoint to resume from, and the learned noise std (or None).

    Raises
    ------
    ValueError
        Data with no batches or an empty batch; inputs the model cannot run on
        (named, with their shape and dtype); targets that do not fit the
        likelihood; NaN or inf in the inputs or targets
        (:class:`~funcbnn.checks.NonFiniteError`, naming the batch).
    TypeError
        Batches that are not ``(inputs, targets)`` pairs, a ``generator`` that
        is not a ``torch.Generator``, a model that does not return a tensor.
    funcbnn.checks.DivergedError
        The loss became non-finite: ``error.step`` is the step (counted over
        the whole run), ``error.state`` the state that step started from.

    Examples
    --------
    Means at ten times the scales' learning rate:

    >>> import funcbnn
    >>> apply_fn, params, _ = funcbnn.functionalize(torch.nn.Linear(3, 2))
    >>> post, prior = funcbnn.diag_gaussian(init_std=0.1), funcbnn.priors.gaussian(1.0)
    >>> def adam(groups):
    ...     lrs = {"mean": 1e-2, "rho": 1e-3}
    ...     return torch.optim.Adam([{**g, "lr": lrs[g["name"]]} for g in groups])
    >>> data = (torch.randn(32, 3), torch.randint(0, 2, (32,)))
    >>> result = fit(apply_fn, post, prior, post.init(params), data, epochs=2, optimizer=adam)
    >>> result.history.loss.shape
    torch.Size([2])

    Interrupt and resume, bit for bit (the checkpoint survives ``torch.save`` and
    a plain ``torch.load``):

    >>> g = torch.Generator().manual_seed(0)
    >>> whole = fit(apply_fn, post, prior, post.init(params), data, epochs=4, batch_size=8, generator=g)
    >>> g = torch.Generator().manual_seed(0)
    >>> half = fit(apply_fn, post, prior, post.init(params), data, epochs=2, batch_size=8, generator=g)
    >>> rest = fit(apply_fn, post, prior, post.init(params), data, epochs=2, batch_size=8,
    ...            generator=torch.Generator(), resume=half.checkpoint)
    >>> torch.equal(rest.state.mean["weight"], whole.state.mean["weight"])
    True
    >>> torch.equal(rest.history.loss, whole.history.loss)
    True
    """
    epochs = positive_int(epochs, "epochs")
    generator = check_generator(generator)
    if process_group is not None and batch_size is not None:
        raise ValueError(
            "with process_group, pass each rank's shard as an iterable of batches (or tensors without "
            "batch_size): shuffling with the shared generator would desynchronise the ranks' weight draws"
        )
    lik = get_likelihood(likelihood)
    ck = checkpoint_of(resume, FitResult, _CHECKPOINT_FORMAT, "vi.fit")
    log_sigma = _learned_noise(lik, noise, ck)
    if ck is not None:
        if not same_layout(ck["state"], state):
            raise ValueError(
                "resume: the checkpoint's state is not shaped like state (another model or family?): "
                f"{describe(ck['state'])} vs {describe(state)}"
            )
        generator = resumed_generator(ck, generator)
    tensor_data = _is_tensor_pair(data)
    batches = _epoch_batches(data, batch_size, generator)
    if num_data is None:
        num_data = _default_num_data(data, batches)
        if process_group is not None:
            num_data = int(distributed.all_reduce_tree(torch.tensor(float(num_data)), process_group))
    if process_group is not None:
        distributed.agree(
            {
                "state": distributed.fingerprint(state if ck is None else ck["state"]),
                "epochs": epochs,
                "num_data": num_data,
                "batches per epoch": len(batches()) if hasattr(batches(), "__len__") else None,
            },
            process_group,
        )
    num_data = positive_int(num_data, "num_data")
    # What a bit-identical continuation needs to be the same; a resume with other settings is refused.
    settings = {
        "likelihood": lik.name,
        "num_data": num_data,
        "batch_size": batch_size,
        "num_samples": num_samples,
        "kl_weight": float(kl_weight.detach()) if isinstance(kl_weight, Tensor) else float(kl_weight),
        "lr": None if optimizer is not None else float(lr),
    }
    saved = None if ck is None else ck.get("settings")
    if saved is not None:
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if changed:
            listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"resume: these settings differ from the run that wrote the checkpoint: {listed}; "
                "pass the same ones to continue it (or start a new fit from result.state)"
            )
    _check_kl_weight(kl_weight)
    if isinstance(kl_weight, Tensor):
        # fit's optimiser does not hold it: its gradient would only pile up in the caller's .grad
        kl_weight = kl_weight.detach()
    num_samples = positive_int(num_samples, "num_samples")
    if kl_samples is not None:
        positive_int(kl_samples, "kl_samples")
    _check_method(method)
    check_family(post, "post")
    _check_state_and_prior(apply_fn, state, prior, "fit(apply_fn, post, prior, state, data)")

    # once per fit: a NaN in the starting state would otherwise surface as a "diverged" step 0
    if ck is None:
        check_finite(state, "state")
    else:
        check_finite(ck["state"], "resume: the checkpoint's state")
    train_state = trainable(state if ck is None else ck["state"])
    groups = param_groups(train_state)
    if log_sigma is not None:
        groups.append({"params": [log_sigma], "name": "noise"})
        lik = likelihoods.learnable_gaussian(log_sigma)
    if optimizer is None:
        opt = torch.optim.Adam(groups, lr=positive_float(lr, "lr"))
    else:
        opt = optimizer(groups)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer must return a torch.optim.Optimizer, got {type(opt).__name__}")
    history: list[ELBOInfo] = []
    previous = 0
    if ck is not None:
        load_optimizer(opt, ck["optimizer"], "the optimiser built on this state")
        previous = int(ck["history"][0].shape[0])
    out = progress_file if progress_file is not None else sys.stderr
    done = 0 if ck is None else int(ck["epochs"])
    for epoch in range(epochs):
        count = 0
        for b, batch in enumerate(batches()):
            where = f"batch {b} of epoch {done + epoch}"
            x, y = _check_batch(batch, f"data {where}")
            if not tensor_data:  # (tensors were detached once; see _epoch_batches)
                x, y = optree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, (x, y))
            if not tensor_data:  # tensors were checked once, as a whole
                check_finite(x, "data inputs", context=where)
                check_finite(y, "data targets", context=where)
            if b == 0 and epoch == 0 and num_samples > 1 and not isinstance(apply_fn, LocalReparamModel):
                _preflight(apply_fn, post, train_state, x, y, lik, buffers)
            try:
                train_state, info = _step(
                    apply_fn, post, prior, train_state, opt, (x, y), num_data, generator=generator,
                    likelihood=lik, num_samples=num_samples, kl_weight=kl_weight, method=method,
                    kl_samples=kl_samples, buffers=buffers, validate=True, process_group=process_group,
                    check_data=False,
                )
            except DivergedError as e:
                index = previous + len(history)
                raise DivergedError(f"step {index} ({where}): {e}", index, e.state) from None
            except ValueError as e:
                if type(e) is not ValueError:  # NonFiniteError and other subclasses keep their type
                    raise
                # what the batch did wrong (inputs the model cannot take, targets that do not fit):
                # say which batch, for a loader whose batches differ
                raise ValueError(f"data {where}: {e}") from (e.__cause__ or e)
            history.append(info)
            count += 1
        if count == 0:
            raise ValueError(
                f"data yielded no batches in epoch {done + epoch}: fit needs at least one (inputs, targets) "
                "batch "
                "per epoch (an empty loader, or a DataLoader with drop_last=True and fewer examples than "
                "batch_size?)"
            )
        if progress and history:
            _draw_progress(out, epoch + 1, epochs, history[-1])
    if progress:
        out.write("\n")
        out.flush()
    stacked = ELBOInfo(*(torch.stack(terms) for terms in zip(*history)))
    if ck is not None:
        stacked = ELBOInfo(*(torch.cat([old, new]) for old, new in zip(ck["history"], stacked)))
    final = optree.tree_map(lambda t: t.detach(), train_state)
    sigma = None if log_sigma is None else log_sigma.detach().exp()
    checkpoint = {
        "format": _CHECKPOINT_FORMAT,
        "version": 1,
        "state": final,
        "optimizer": opt.state_dict(),
        **generator_state(generator),
        "epochs": done + epochs,
        "history": list(stacked),
        "log_sigma": None if log_sigma is None else log_sigma.detach().clone(),
        "settings": settings,
    }
    return FitResult(final, stacked, checkpoint, sigma)


def _draw_progress(out: TextIO, done: int, total: int, info: ELBOInfo, width: int = 24) -> None:
    filled = round(width * done / total)
    bar = "#" * filled + "-" * (width - filled)
    out.write(
        f"\r[{bar}] epoch {done}/{total}  loss {float(info.loss):.4g}  "
        f"nll {float(info.nll):.4g}  kl {float(info.kl):.4g}"
    )
    out.flush()

