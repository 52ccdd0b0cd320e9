"""Monte-Carlo prediction: many weight samples in one batched forward, and their summary.

:func:`sample_outputs` evaluates ``apply_fn`` at every weight sample with
``torch.func.vmap`` over the samples' leading axis, in chunks sized so that no
batched intermediate grows past a few MiB, or with a loop where that was
measured faster (the library's one engine for this, ``funcbnn._engine``).
:func:`summarize` turns the ``(S, N, ...)`` outputs into predictive means,
variances and the epistemic/aleatoric split.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import optree
import torch
from torch import Tensor

from . import distributed
from .checks import NonFiniteError, all_finite, check_finite, finite_checks_enabled, model_input_error
from ._engine import CHUNK_BUDGET_BYTES, VmapFallbackWarning, apply_samples
from ._validation import positive_int
from .likelihoods import Likelihood, get_likelihood
from .model import FunctionalModel
from .summary import PredictiveSummary
from .tree import Tree, leaf_names

__all__ = [
    "VmapFallbackWarning",
    "sample_outputs",
    "PredictiveSummary",
    "summarize",
    "CHUNK_BUDGET_BYTES",
]

_METHODS = ("auto", "vmap", "loop")
_RANDOMNESS = ("different", "same", "error")


def _reject_state(samples: Any) -> None:
    """A posterior state (a family's NamedTuple) where weight samples belong gets its own message."""
    if isinstance(samples, tuple) and hasattr(samples, "_fields") and type(samples).__module__.startswith(
        "funcbnn.families"
    ):
        raise TypeError(
            f"samples is a posterior state ({type(samples).__name__}), not weight samples; "
            "draw samples with post.sample(state, S) and pass those"
        )


def _reject_single_tree(samples: Tree, apply_fn: Callable) -> None:
    """One parameter tree (no sample axis) where samples belong: say so, instead of a shape riddle."""
    if not isinstance(apply_fn, FunctionalModel):
        return
    try:
        apply_fn.check_params(samples, "samples", leading=0)
    except (TypeError, ValueError):
        return
    raise ValueError(
        "samples has the model's parameter shapes without a leading sample axis: it is one parameter tree, "
        "not samples. Draw samples with post.sample(state, S), or pass optree.tree_map(lambda t: t[None], "
        "params) for a single sample"
    )


def _check_samples(samples: Tree, apply_fn: Callable) -> int:
    leaves = optree.tree_leaves(samples)
    if not leaves:
        raise ValueError("samples must be a tree with at least one tensor leaf")
    _reject_single_tree(samples, apply_fn)
    names = leaf_names(samples)
    for name, leaf in zip(names, leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"samples: leaf '{name}' must be a Tensor, got {type(leaf).__name__}")
        if leaf.dim() == 0:
            raise ValueError(f"samples: leaf '{name}' is 0-d; every leaf needs a leading sample axis")
    num = leaves[0].shape[0]
    for name, leaf in zip(names, leaves):
        if leaf.shape[0] != num:
            raise ValueError(
                f"samples: every leaf needs the same leading sample axis; '{names[0]}' has {num} "
                f"samples but '{name}' has {leaf.shape[0]}"
            )
    if num == 0:
        raise ValueError("samples hold 0 samples; need at least one")
    if isinstance(apply_fn, FunctionalModel):
        apply_fn.check_params(samples, "samples", leading=1)
    return num


def sample_outputs(
    apply_fn: Callable[[Tree, Any], Any],
    samples: Tree,
    x: Any,
    *,
    chunk_size: int | None = None,
    method: Literal["auto", "vmap", "loop"] = "auto",
    randomness: Literal["different", "same", "error"] = "different",
    memory_budget: int = CHUNK_BUDGET_BYTES,
    process_group: Any = None,
    shard: Literal["samples", "data"] = "samples",
) -> Any:
    """Evaluate ``apply_fn(sample_s, x)`` for every weight sample, as one batched forward.

    Parameters
    ----------
    apply_fn : callable
        ``apply_fn(params, x) -> output``, e.g. from :func:`funcbnn.model.functionalize`.
    samples : Tree
        Parameter tree whose leaves carry a leading sample axis of size ``S``
        (what ``posterior.sample(state, S)`` returns).
    x : Tensor, tree of tensors, or Inputs
        Model input, shared by all samples. For a forward with several
        (positional or keyword) inputs, pass :class:`funcbnn.model.Inputs`
        (``Inputs(x, z, mask=m)``). It is never modified: a forward that
        writes into its input gets copies.
    chunk_size : int, optional
        Samples per vmapped call. By default it is chosen so that the largest
        batched intermediate stays under ``memory_budget`` bytes (measured once
        per model and input shape by tracing one example).
    method : {"auto", "vmap", "loop"}
        ``"auto"`` times the call both ways (the first chunk, if there are
        several) the first time it meets a model, input shape, sample count
        and chunk size, alternating the two over several rounds, and keeps the
        faster path from then on; both compute the same numbers, so the choice
        changes results by float rounding at most. If the forward cannot run
        under ``vmap`` it warns once with :class:`VmapFallbackWarning` and
        loops over samples. ``"vmap"`` and ``"loop"`` force a path.
    randomness : {"different", "same", "error"}
        Random ops in the forward (MC dropout): ``"different"`` draws anew for
        every sample, ``"same"`` gives every sample the same draws (the loop
        replays one RNG state), ``"error"`` makes vmap raise on a random op
        (and is never silently replaced by a loop). A forward with random ops
        is never timed: ``"auto"`` runs it batched (unless vmap fails), so
        its masks do not depend on a measurement; which masks come out depends
        on the chunk size and path. Timing runs consume no random numbers.
    memory_budget : int
        Byte cap used to pick ``chunk_size``.
    process_group : torch.distributed group, optional
        Split the work over the group's ranks and gather the result on every
        rank (the same tensor one process returns). Every rank passes the same
        ``samples`` (drawn from the same generator state) and ``x``.
    shard : {"samples", "data"}
        With ``process_group``: each rank runs a contiguous block of the samples
        (default) or of the examples.

    Returns
    -------
    Tensor or tree
        Outputs with a leading axis of ``S``: ``(S, N, ...)`` for a model mapping
        ``(N, ...)`` to ``(N, ...)``.

    Raises
    ------
    ValueError
        On malformed samples, an ``x`` the model cannot take (also when it is
        found on a later call, e.g. token ids out of an embedding's range: the
        message names ``x``, its shape, dtype and value range), or a
        train-mode BatchNorm (which would update running statistics in place)
        under vmap.
    TypeError
        If ``samples`` is a posterior state rather than draws from it.
    funcbnn.checks.NonFiniteError
        If the outputs hold NaN or inf; the message names the culprit: ``x``,
        a leaf of ``samples``, or the forward itself. One reduction over the
        outputs per call; :func:`funcbnn.checks.set_finite_checks` turns it off.

    Examples
    --------
    >>> from funcbnn.model import functionalize
    >>> from funcbnn.families import diag_gaussian
    >>> apply_fn, params, _ = functionalize(torch.nn.Linear(3, 2))
    >>> post = diag_gaussian(init_std=0.1)
    >>> samples = post.sample(post.init(params), 16, generator=torch.Generator().manual_seed(0))
    >>> sample_outputs(apply_fn, samples, torch.randn(5, 3)).shape
    torch.Size([16, 5, 2])
    """
    if method not in _METHODS:
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
    if randomness not in _RANDOMNESS:
        raise ValueError(f"randomness must be 'different', 'same' or 'error', got {randomness!r}")
    if chunk_size is not None:
        positive_int(chunk_size, "chunk_size")
    positive_int(memory_budget, "memory_budget")
    _reject_state(samples)
    # Every call: the cheap part (one common, non-zero leading size). The full check (leaf
    # names, trailing shapes against the model) runs once per signature, inside the engine.
    leads = {t.shape[0] if isinstance(t, Tensor) and t.dim() else None for t in optree.tree_leaves(samples)}
    if len(leads) != 1 or not next(iter(leads)):
        _check_samples(samples, apply_fn)  # raises the detailed error
    if method != "loop" and isinstance(apply_fn, FunctionalModel) and apply_fn.stats_layers_in_train_mode:
        raise ValueError(
            f"BatchNorm/InstanceNorm layers {apply_fn.stats_layers_in_train_mode} are in training mode and would "
            "update their running statistics in place, which cannot be batched over weight samples. "
            "Functionalize the module with them in eval mode (train=False, or a predicate that returns "
            "False for BatchNorm layers), or pass method='loop'."
        )
    def run(part: Tree, inputs: Any) -> Any:
        return apply_samples(
            apply_fn,
            part,
            inputs,
            method=method,
            chunk_size=chunk_size,
            memory_budget=memory_budget,
            randomness=randomness,
            validate=lambda: _check_samples(part, apply_fn),
        )

    # Outside the engine's vmap-or-loop choice, so its fallback still sees torch's own error:
    # what reaches here failed both ways, and is the input's fault (an index out of range),
    # unless it is vmap's own complaint on a path the caller forced.
    try:
        if process_group is None:
            out = run(samples, x)
        else:
            out = _sharded(run, samples, x, shard, process_group)
    except (RuntimeError, IndexError) as e:
        if _is_vmap_limitation(e) or type(e).__module__.startswith("funcbnn"):
            raise
        raise model_input_error(e, x, samples, "x", "sample_outputs") from e
    _check_outputs(out, samples, x)
    return out


def _is_vmap_limitation(error: BaseException) -> bool:
    """torch.func's errors about what vmap cannot do (``.item()``, random ops in "error" mode, in-place)."""
    first = str(error).strip().split("\n", 1)[0]
    return first.startswith("vmap") or "Batching rule" in first or "randomness" in first


def _floating_leaves(tree: Any) -> list[Tensor]:
    return [t for t in optree.tree_leaves(tree) if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]


def _check_outputs(out: Any, samples: Tree, x: Any) -> None:
    """One cheap pass over the outputs; only when it fails, the culprit is looked for and named."""
    if not finite_checks_enabled():
        return
    if type(out) is Tensor and out.is_floating_point():
        # The common case without the tree walk and bookkeeping (~8 us of Python on a 0.1 ms call).
        if math.isfinite((out.detach() if out.requires_grad else out).sum().item()):
            return
    leaves = _floating_leaves(out)
    if all_finite(leaves):
        return
    hint = "or turn the check off with funcbnn.checks.set_finite_checks(False)"
    check_finite(x, "x", context=f"sample_outputs got non-finite inputs; clean them, {hint}")
    check_finite(samples, "samples", context=f"a weight sample is non-finite (a diverged posterior?); {hint}")
    bad = next(o for o in leaves if not bool(torch.isfinite(o).all()))
    per_sample = (~torch.isfinite(bad)).reshape(bad.shape[0], -1).any(1) if bad.dim() else torch.ones(1, dtype=torch.bool)
    first = int(per_sample.nonzero()[0, 0])
    raise NonFiniteError(
        f"the model's outputs are non-finite ({int(torch.isnan(bad).sum())} NaN, {int(torch.isinf(bad).sum())} "
        f"inf; first at sample {first} of {bad.shape[0] if bad.dim() else 1}) although x and the samples are "
        f"finite: the forward overflows or divides by zero there. Use a smaller posterior spread, a wider "
        f"dtype, {hint}"
    )


def _sharded(run: Callable[[Tree, Any], Any], samples: Tree, x: Any, shard: str, process_group: Any) -> Any:
    """Every rank evaluates its block of samples (or of examples) and all ranks gather the blocks in order."""
    if shard not in ("samples", "data"):
        raise ValueError(f"shard must be 'samples' or 'data', got {shard!r}")
    rank, size = distributed.world(process_group)
    num = optree.tree_leaves(samples)[0].shape[0]
    x_leaves = optree.tree_leaves(x)
    n = x_leaves[0].shape[0] if x_leaves and isinstance(x_leaves[0], Tensor) and x_leaves[0].dim() else None
    if shard == "data" and n is None:
        raise ValueError("shard='data' needs x with a leading batch axis")
    distributed.agree(
        {"samples": distributed.fingerprint(samples), "x": [tuple(t.shape) for t in x_leaves if isinstance(t, Tensor)],
         "shard": shard},
        process_group,
    )
    total = num if shard == "samples" else n
    counts = [len(distributed.shard_range(total, r, size)) for r in range(size)]
    mine = distributed.shard_range(total, rank, size)
    if shard == "samples":
        if len(mine):
            local = run(optree.tree_map(lambda t: t[mine.start : mine.stop], samples), x)
        else:  # an empty block still needs the output's trailing shape
            local = optree.tree_map(lambda o: o[:0], run(optree.tree_map(lambda t: t[:1], samples), x))
        return distributed.all_gather_blocks(local, counts, process_group)
    head = optree.tree_map(lambda t: t[mine.start : mine.stop] if isinstance(t, Tensor) else t, x)
    if len(mine):
        local = run(samples, head)
    else:
        local = optree.tree_map(lambda o: o[:, :0], run(samples, optree.tree_map(lambda t: t[:1] if isinstance(t, Tensor) else t, x)))
    # gather along the example axis (axis 1): move it first, gather, move it back
    moved = optree.tree_map(lambda o: o.transpose(0, 1).contiguous(), local)
    return optree.tree_map(lambda o: o.transpose(0, 1), distributed.all_gather_blocks(moved, counts, process_group))


def summarize(
    outputs: Tensor | tuple[Tensor, Tensor],
    likelihood: str | Likelihood,
    *,
    noise_std: float | Tensor | None = None,
    outputs_are: Literal["logits", "probs"] | None = None,
    log_variance: bool | None = None,
) -> PredictiveSummary:
    """Summarize Monte-Carlo outputs ``(S, N, ...)`` into a :class:`~funcbnn.summary.PredictiveSummary`.

    Parameters
    ----------
    outputs : Tensor or (Tensor, Tensor)
        Per-sample model outputs with the sample axis first.
    likelihood : str or Likelihood
        Any name of :data:`funcbnn.likelihoods.LIKELIHOODS` or its alias:

        - ``"categorical"`` / ``"classification"``: last axis holds class logits (or probabilities).
        - ``"bernoulli"`` / ``"binary"``: one logit (or probability) of the positive class per
          output; ``probs`` is then ``(..., 2)`` over (negative, positive).
        - ``"gaussian"`` / ``"regression"``: outputs are means; ``noise_std`` gives the
          aleatoric std (by default the likelihood object's ``sigma``, 0 for a name).
        - ``"heteroscedastic_gaussian"`` / ``"heteroscedastic_regression"`` /
          ``"heteroscedastic"``: outputs are ``(mean, log_var)`` as a tuple, or one tensor
          whose last axis holds the means in its first half and the log-variances in its second.
    noise_std : float or Tensor, optional
        Observation noise std for the Gaussian likelihood.
    outputs_are : {"logits", "probs"}, optional
        For the classification likelihoods: whether a softmax/sigmoid is still
        to be applied (default ``"logits"``).
    log_variance : bool, optional
        For the heteroscedastic likelihood: whether the second output is a
        log-variance (the default) or a variance.

    Raises
    ------
    funcbnn.checks.NonFiniteError
        If ``outputs`` hold NaN or inf (unless the checks are turned off).
    ValueError
        For ``outputs_are="probs"``: binary probabilities outside [0, 1], or
        class probabilities that are negative or do not sum to 1.

    Examples
    --------
    >>> out = torch.randn(32, 10, 3)  # 32 samples, 10 inputs, 3 classes
    >>> s = summarize(out, "classification")
    >>> s.probs.shape, s.mutual_info.shape
    (torch.Size([10, 3]), torch.Size([10]))
    """
    lik = get_likelihood(likelihood)
    if finite_checks_enabled() and not all_finite(_floating_leaves(outputs)):
        check_finite(outputs, "outputs", context="summarize needs finite model outputs")
    if noise_std is None and isinstance(likelihood, Likelihood) and lik.sigma is not None:
        noise_std = lik.sigma
    options = {"noise_std": noise_std, "outputs_are": outputs_are, "log_variance": log_variance}
    return lik.summarize(outputs, **{k: v for k, v in options.items() if v is not None})
