"""The posterior protocol, written down: what every family provides and what it may declare.

A *family* is a ``NamedTuple`` of pure functions over a *state*, itself a
``NamedTuple`` of tensors and trees of tensors (so ``torch.save`` /
``torch.load`` with ``weights_only=True``, ``optree.tree_map`` and any
``torch.optim`` optimiser work on it). The protocol, in the style of optax's
``GradientTransformation``:

Required
--------
``init(params, *, generator=None) -> state``
    A state centred on ``params`` (a tree of floating-point tensors).
``sample(state, num_samples, *, generator=None) -> tree``
    ``num_samples`` draws, every leaf shaped ``(num_samples, *leaf.shape)``; not
    differentiable. The same generator state gives the same draws.
``kl(state, prior, *, reduction="sum", num_samples=None, generator=None) -> Tensor``
    ``KL(q || prior)``, a scalar; analytic where the (family, prior) pair has a
    closed form, else Monte-Carlo with ``num_samples`` draws (and an error
    naming ``num_samples`` if it is missing). ``reduction="mean"`` divides by
    the number of weights.

Capabilities (optional fields; ``None`` or absent where a family lacks one)
---------------------------------------------------------------------------
See :data:`CAPABILITIES`. Code asks with :func:`capabilities` or
:func:`require`, never by checking which family it was given, and the
contract suite (``tests/test_contract.py``) selects its tests the same way.

Registry
--------
:data:`funcbnn.families.FAMILIES` maps a name to a factory and to a *contract
example*: a function ``(params, generator) -> (family, state)`` giving a small
state with non-trivial spread, on which the contract suite runs. A new family
is one file plus one ``FAMILIES.register(name, example=...)`` line.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["REQUIRED", "CAPABILITIES", "capabilities", "require", "check_family"]

REQUIRED: tuple[str, ...] = ("init", "sample", "kl")
"""The three functions every family has."""

CAPABILITIES: dict[str, str] = {
    "rsample": "rsample(state, n, *, generator) -> tree: reparameterised draws, differentiable in the "
    "state; for the same generator state the same values as sample (VI needs it)",
    "log_prob": "log_prob(state, params) -> Tensor: log q(params); leading batch dims of params kept",
    "entropy": "entropy(state) -> Tensor: differential entropy of q",
    "mean": "mean(state) -> tree: the mean of q",
    "variance": "variance(state) -> tree: the marginal variances of q, shaped like the mean",
    "logdet_precision": "logdet_precision(state) -> Tensor: log det of q's precision (inverse covariance)",
    "functional_variance": "functional_variance(state, jac) -> (N, O, O): J Cov J^T for per-leaf Jacobians "
    "jac[leaf] of shape (N, O, *leaf.shape), the linearised (GLM) output covariance",
    "sample_and_kl": "sample_and_kl(state, prior, n, *, generator, kl_samples) -> (tree, Tensor): rsample and "
    "kl in one pass sharing intermediates (speed; same numbers as the two calls)",
}
"""Optional capabilities: name -> signature and meaning."""


def capabilities(family: Any) -> frozenset[str]:
    """The capabilities ``family`` declares (fields present and not ``None``).

    Examples
    --------
    >>> from funcbnn.families import diag_gaussian
    >>> sorted(capabilities(diag_gaussian()))[:3]
    ['entropy', 'functional_variance', 'log_prob']
    """
    return frozenset(name for name in CAPABILITIES if getattr(family, name, None) is not None)


def require(family: Any, capability: str, who: str) -> Callable[..., Any]:
    """``family.<capability>``, or a ``TypeError`` naming who needs it and what the family offers."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; known: {sorted(CAPABILITIES)}")
    fn = getattr(family, capability, None)
    if fn is None:
        raise TypeError(
            f"{who} needs a posterior family with {capability!r} ({CAPABILITIES[capability]}); "
            f"{type(family).__name__} offers {sorted(capabilities(family)) or 'none'}"
        )
    return fn


def check_family(family: Any, name: str = "post") -> None:
    """Raise ``TypeError`` naming ``name`` if ``family`` lacks one of :data:`REQUIRED`."""
    missing = [f for f in REQUIRED if not callable(getattr(family, f, None))]
    if missing:
        raise TypeError(
            f"{name} must be a posterior family with callable {list(REQUIRED)} (e.g. funcbnn.diag_gaussian()), "
            f"got {type(family).__name__} without {missing}"
        )
