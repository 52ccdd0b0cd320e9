"""Monte-Carlo prediction: many weight samples in one batched forward, and their summary.

:func:`sample_outputs` evaluates ``apply_fn`` at every weight sample with
``torch.func.vmap`` over the samples' leading axis, in chunks sized so that no
batched intermediate grows past a few MiB. :func:`summarize` turns the
``(S, N, ...)`` outputs into predictive means, variances and the
epistemic/aleatoric split.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Callable, Literal, NamedTuple

import optree
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ._batching import vmap_is_faster, vmap_leading
from ._validation import positive_float, positive_int
from .model import FunctionalModel
from .likelihoods import Likelihood, get_likelihood
from .summary import PredictiveSummary
from .tree import Tree, leaf_names

__all__ = [
    "VmapFallbackWarning",
    "sample_outputs",
    "PredictiveSummary",
    "summarize",
    "CHUNK_BUDGET_BYTES",
]

CHUNK_BUDGET_BYTES = 16 * 2**20
"""Default cap on the largest batched intermediate (bytes) when picking a chunk size.

glibc's malloc serves each allocation above its mmap threshold (at most 32 MiB)
with a fresh ``mmap`` and page-faults it in on every use; batched tensors past
that size made the vmapped path 2-4x slower than a loop on this project's
measurements. Keeping them at half the threshold leaves room for the other
live intermediates of the same size.
"""


class VmapFallbackWarning(UserWarning):
    """The model's forward failed under ``vmap`` and a loop over samples is used instead."""


class _Probe(NamedTuple):
    bytes_per_example: int  # largest single intermediate of one sample's forward, per example
    vmap_failed: bool
    # Measured choice per (chunk size, batch size): True where the vmapped chunk beat the loop.
    vmap_faster: dict


class _LargestTensor(TorchFunctionMode):
    """Records the size of the largest tensor any torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.max_bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        for t in optree.tree_leaves(out) if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
        return out


# Per apply_fn: probe results keyed on the input and parameter signature, so the
# probe forward runs once per (model, input shape) rather than once per call.
_PROBES: "weakref.WeakKeyDictionary[Any, dict[tuple, _Probe]]" = weakref.WeakKeyDictionary()


def _hashable(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return ("unhashable", id(value))


def _signature(x: Any, samples: Tree, randomness: str) -> tuple:
    """What a cached probe depends on: the input's trailing shapes and non-tensor leaves,
    the samples' structure and trailing shapes, and the vmap randomness mode."""
    x_leaves, x_spec = optree.tree_flatten(x)
    xs = tuple(
        (tuple(t.shape[1:]), t.dtype, t.device) if isinstance(t, Tensor) else _hashable(t) for t in x_leaves
    )
    leaves, spec = optree.tree_flatten(samples)
    ps = tuple((tuple(t.shape[1:]), t.dtype, t.device) if isinstance(t, Tensor) else None for t in leaves)
    return x_spec, xs, spec, ps, randomness


def _batch_size(x: Any) -> int | None:
    leaves = [t for t in optree.tree_leaves(x) if isinstance(t, Tensor)]
    if not leaves or any(t.dim() == 0 for t in leaves):
        return None
    n = leaves[0].shape[0]
    return n if all(t.shape[0] == n for t in leaves) else None


def _head(x: Any, n: int) -> Any:
    return optree.tree_map(lambda t: t[:n] if isinstance(t, Tensor) else t, x)


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} and dtype {x.dtype}"
    return "structure " + str(optree.tree_map(lambda t: tuple(t.shape) if isinstance(t, Tensor) else t, x))


def _probe(apply_fn: Callable, first: Tree, x: Any) -> _Probe:
    """Run one sample on the first two examples: validates ``x`` and measures the footprint per example.

    Two, not one: train-mode batch statistics need more than one value per channel.
    If the head of ``x`` fails, ``x`` may be a single unbatched input: try it whole.
    """
    n = _batch_size(x)
    attempts = [(_head(x, min(n, 2)), min(n, 2))] if n is not None and n > 2 else []
    attempts.append((x, n or 1))
    for i, (inputs, seen) in enumerate(attempts):
        recorder = _LargestTensor()
        try:
            with torch.no_grad(), recorder:
                apply_fn(first, inputs)
        except Exception as err:
            if i + 1 < len(attempts):
                continue
            dtypes = sorted({str(t.dtype) for t in optree.tree_leaves(first)})
            raise ValueError(
                f"x with {_describe(x)} does not fit the model: calling it on x with the first weight "
                f"sample (dtype {', '.join(dtypes)}) failed with {type(err).__name__}: {err}. "
                "Check x's trailing shape and dtype, and that the samples fit the model."
            ) from err
        return _Probe(max(recorder.max_bytes // seen, 1), False, {})
    raise AssertionError("unreachable")


def _loop(apply_fn: Callable, samples: Tree, x: Any, num_samples: int, randomness: str = "different") -> Any:
    """One forward per sample. ``randomness="same"`` replays one RNG state for every sample."""
    leaves, spec = optree.tree_flatten(samples)
    devices = sorted({t.device for t in leaves if t.device.type != "cpu"}, key=str)
    outs = []
    with torch.random.fork_rng(devices=devices, enabled=randomness == "same"):
        start = torch.random.get_rng_state() if randomness == "same" else None
        cuda = [torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"] if randomness == "same" else []
        for i in range(num_samples):
            if start is not None:
                torch.random.set_rng_state(start)
                for d, state in zip([d for d in devices if d.type == "cuda"], cuda):
                    torch.cuda.set_rng_state(state, d)
            outs.append(apply_fn(optree.tree_unflatten(spec, [leaf[i] for leaf in leaves]), x))
    return optree.tree_map(lambda *o: torch.stack(o), *outs)


def _vmapped(apply_fn: Callable, samples: Tree, x: Any, num_samples: int, chunk: int, randomness: str) -> Any:
    if chunk >= num_samples:
        return vmap_leading(apply_fn, samples, x, randomness=randomness)
    leaves, spec = optree.tree_flatten(samples)
    outs = [
        vmap_leading(apply_fn, optree.tree_unflatten(spec, [leaf[i : i + chunk] for leaf in leaves]), x, randomness=randomness)
        for i in range(0, num_samples, chunk)
    ]
    return optree.tree_map(lambda *o: torch.cat(o), *outs)


def _check_samples(samples: Tree, apply_fn: Callable) -> int:
    leaves = optree.tree_leaves(samples)
    if not leaves:
        raise ValueError("samples must be a tree with at least one tensor leaf")
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
) -> Any:
    """Evaluate ``apply_fn(sample_s, x)`` for every weight sample, as one batched forward.

    Parameters
    ----------
    apply_fn : callable
        ``apply_fn(params, x) -> output``, e.g. from :func:`funcbnn.model.functionalize`.
    samples : Tree
        Parameter tree whose leaves carry a leading sample axis of size ``S``
        (what ``posterior.sample(state, S)`` returns).
    x : Tensor or tree of tensors
        Model input, shared by all samples.
    chunk_size : int, optional
        Samples per vmapped call. By default it is chosen so that the largest
        batched intermediate stays under ``memory_budget`` bytes (measured once
        per model and input shape by tracing one example).
    method : {"auto", "vmap", "loop"}
        ``"auto"`` times one chunk both ways the first time it meets a model,
        input shape and chunk size, and keeps the faster path from then on; if
        the forward cannot run under ``vmap`` it warns once with
        :class:`VmapFallbackWarning` and loops over samples. ``"vmap"`` and
        ``"loop"`` force a path.
    randomness : {"different", "same", "error"}
        Random ops in the forward (MC dropout): ``"different"`` draws anew for
        every sample, ``"same"`` gives every sample the same draws (the loop
        replays one RNG state), ``"error"`` makes vmap raise on a random op
        (and is never silently replaced by a loop). Only ``"different"`` lets
        ``"auto"`` choose the path by timing. Which masks come out
        depends on the chunk size and path, and the first ``"auto"`` call's
        timing runs also consume random numbers.
    memory_budget : int
        Byte cap used to pick ``chunk_size``.

    Returns
    -------
    Tensor or tree
        Outputs with a leading axis of ``S``: ``(S, N, ...)`` for a model mapping
        ``(N, ...)`` to ``(N, ...)``.

    Raises
    ------
    ValueError
        On malformed samples, an ``x`` the model cannot take, or a train-mode
        BatchNorm (which would update running statistics in place) under vmap.

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
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
    if randomness not in ("different", "same", "error"):
        raise ValueError(f"randomness must be 'different', 'same' or 'error', got {randomness!r}")
    if chunk_size is not None:
        positive_int(chunk_size, "chunk_size")
    positive_int(memory_budget, "memory_budget")
    try:
        cache = _PROBES.setdefault(apply_fn, {})
    except TypeError:  # not weak-referenceable: probe every call
        cache = {}
    key = _signature(x, samples, randomness)
    probe = cache.get(key)
    leads = {leaf.shape[0] if isinstance(leaf, Tensor) and leaf.dim() else None for leaf in optree.tree_leaves(samples)}
    if probe is not None and len(leads) == 1 and (lead := leads.pop()):
        num_samples = lead  # structure and trailing shapes were validated for this key
    else:
        num_samples = _check_samples(samples, apply_fn)

    if method != "loop" and isinstance(apply_fn, FunctionalModel) and apply_fn.stats_layers_in_train_mode:
        raise ValueError(
            f"BatchNorm/InstanceNorm layers {apply_fn.stats_layers_in_train_mode} are in training mode and would "
            "update their running statistics in place, which cannot be batched over weight samples. "
            "Functionalize the module with them in eval mode (train=False, or a predicate that returns "
            "False for BatchNorm layers), or pass method='loop'."
        )
    if probe is None:
        first = optree.tree_map(lambda t: t[0], samples)
        probe = cache[key] = _probe(apply_fn, first, x)

    if method == "loop" or (method == "auto" and probe.vmap_failed):
        return _loop(apply_fn, samples, x, num_samples, randomness)
    if chunk_size is None:
        per_sample = probe.bytes_per_example * (_batch_size(x) or 1)
        chunk_size = max(1, min(num_samples, memory_budget // per_sample))
    chunk_size = min(chunk_size, num_samples)
    if method == "vmap" or randomness != "different":
        # Only "different" means the same thing on both paths, so only it may be timed.
        try:
            return _vmapped(apply_fn, samples, x, num_samples, chunk_size, randomness)
        except Exception as err:
            if method == "vmap" or randomness == "error":
                raise
            return _fall_back(err, cache, key, probe, apply_fn, samples, x, num_samples, randomness)

    decision = (chunk_size, _batch_size(x))
    if probe.vmap_faster.get(decision) is False:
        return _loop(apply_fn, samples, x, num_samples)
    if decision not in probe.vmap_faster:
        # First call for this chunk and batch size: time one chunk both ways and keep
        # the faster path (the batched path loses to a loop for some conv shapes).
        leaves, spec = optree.tree_flatten(samples)
        part = optree.tree_unflatten(spec, [leaf[:chunk_size] for leaf in leaves])
        try:
            _vmapped(apply_fn, part, x, chunk_size, chunk_size, randomness)  # warm-up
        except Exception as err:
            return _fall_back(err, cache, key, probe, apply_fn, samples, x, num_samples, randomness)
        _loop(apply_fn, part, x, 1)  # warm-up
        faster = vmap_is_faster(
            lambda: _vmapped(apply_fn, part, x, chunk_size, chunk_size, randomness),
            lambda: _loop(apply_fn, part, x, chunk_size),
        )
        probe.vmap_faster[decision] = faster
        if not faster:
            return _loop(apply_fn, samples, x, num_samples)
    return _vmapped(apply_fn, samples, x, num_samples, chunk_size, randomness)


def _fall_back(err, cache, key, probe, apply_fn, samples, x, num_samples, randomness) -> Any:
    """Remember that vmap failed for this key, warn once, and loop."""
    cache[key] = probe._replace(vmap_failed=True)
    warnings.warn(
        f"the model's forward failed under torch.func.vmap ({type(err).__name__}: {err}); "
        "evaluating the weight samples in a Python loop instead. Pass method='loop' to "
        "silence this warning, or make the forward vmap-compatible (no in-place updates of "
        "inputs or buffers, no .item() or data-dependent control flow) for the batched path.",
        VmapFallbackWarning,
        stacklevel=3,
    )
    return _loop(apply_fn, samples, x, num_samples, randomness)


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

    Examples
    --------
    >>> out = torch.randn(32, 10, 3)  # 32 samples, 10 inputs, 3 classes
    >>> s = summarize(out, "classification")
    >>> s.probs.shape, s.mutual_info.shape
    (torch.Size([10, 3]), torch.Size([10]))
    """
    lik = get_likelihood(likelihood)
    if noise_std is None and isinstance(likelihood, Likelihood) and lik.sigma is not None:
        noise_std = lik.sigma
    options = {"noise_std": noise_std, "outputs_are": outputs_are, "log_variance": log_variance}
    return lik.summarize(outputs, **{k: v for k, v in options.items() if v is not None})
