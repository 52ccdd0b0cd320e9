"""Output covariance of the linearised network, without materialising the Jacobian.

The GLM predictive (Immer et al. 2021; Daxberger et al. 2021) needs, per test
input, ``Cov[f] = J S J^T`` with ``J = d f / d theta`` at the MAP and ``S`` the
posterior covariance. Forming ``J`` costs ``N x O x P`` numbers, which for a
full network is gigabytes. For ``nn.Linear`` layers on 2-D input the
per-example Jacobian of output ``o`` in the weight is the outer product
``g_o a^T`` (``g_o`` the gradient of output ``o`` in the layer's output, ``a``
its input), so for a diagonal ``S`` with variances ``V``::

    [J S J^T]_{op} = sum_i g_{o,i} g_{p,i} (V (a * a))_i          (bias: a_j = 1)

one ``O x O`` contraction per example over the layer's *width*, never its
weights. The ``g_o`` come from the same zero "tap" trick as the curvature
engine: one forward and ``O`` backward passes to the taps for the whole batch.
Convolutions and Linear layers on sequences form per-example weight Jacobians
from unfolded inputs (``O x N x |W|``, bounded by ``chunk_size``); any other
leaf goes through a chunked ``vmap(jacrev)`` restricted to that leaf.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .._validation import positive_int
from ._subset import split
from ._taps import Layer, structured_layers, tapped_forward
from .curvature import _per_example_grads

__all__ = ["diag_output_covariance"]

# weigh(layer, a, G) -> (N, O, O): the layer's share of J S J^T given its inputs ``a`` (N, ...)
# and output gradients ``G`` (O, N, ...) for each output.
Weigh = Callable[[Layer, Tensor, Tensor], Tensor]


def _diag_weigh(variances: dict[str, Tensor]) -> Weigh:
    def weigh(layer: Layer, a: Tensor, G: Tensor) -> Tensor:
        vw = variances[layer.weight]
        vb = variances[layer.bias] if layer.bias else None
        if isinstance(layer.module, nn.Linear) and a.dim() == 2:
            u = a.square() @ vw.T  # (N, out)
            if vb is not None:
                u = u + vb
            return torch.einsum("oni,pni,ni->nop", G, G, u)
        jw, jb = zip(*(_per_example_grads(layer, a, g) for g in G))
        jw = torch.stack(jw).flatten(2)  # (O, N, |W|)
        cov = torch.einsum("onk,pnk,k->nop", jw, jw, vw.reshape(-1))
        if vb is not None:
            jb = torch.stack(jb)  # (O, N, out)
            cov = cov + torch.einsum("oni,pni,i->nop", jb, jb, vb)
        return cov

    return weigh


class _Unstructured(Exception):
    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers


def _structured_part(
    apply_fn: Any, params: dict[str, Tensor], layers: list[Layer], x: Tensor, weigh: Weigh
) -> tuple[Tensor, Tensor]:
    """Outputs ``(N, *out)`` and the structured layers' share of the covariance ``(N, O, O)``."""
    f, calls = tapped_forward(apply_fn, params, layers, x)
    count = [0] * len(layers)
    for c in calls:
        count[c.layer] += 1
    if any(k != 1 for k in count):
        # A layer called twice (or never) has no single (input, output-gradient) pair.
        raise _Unstructured([layer for layer, k in zip(layers, count) if k != 1])
    acts = {c.layer: c.input for c in calls}
    taps = {c.layer: c.tap for c in calls}
    n = f.shape[0]
    flat = f.reshape(n, -1)
    num_out = flat.shape[1]
    cov = flat.new_zeros(n, num_out, num_out)
    if not layers:
        return f.detach(), cov
    tap_list = [taps[i] for i in range(len(layers))]
    # Examples are independent (eval mode), so the gradient of sum_n f[n, o] in a tap is, row by
    # row, each example's own gradient of its output o.
    per_output = [
        torch.autograd.grad(flat[:, o].sum(), tap_list, retain_graph=o < num_out - 1, allow_unused=True)
        for o in range(num_out)
    ]
    for i, layer in enumerate(layers):
        if per_output[0][i] is None:  # the layer's output never reaches f
            continue
        G = torch.stack([grads[i] for grads in per_output])  # (O, N, *layer out)
        cov += weigh(layer, acts[i], G)
    return f.detach(), cov  # a graph to the variances only (the output gradients are constants)


def _generic_part(
    apply_fn: Any, params: dict[str, Tensor], variances: dict[str, Tensor], names: list[str], x: Tensor
) -> Tensor:
    sub, subset = split(params, names)

    def f_one(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return apply_fn(subset.merge(p), xi[None])[0].reshape(-1)

    jac = torch.func.vmap(torch.func.jacrev(f_one), in_dims=(None, 0))(sub, x)  # leaf: (N, O, *leaf)
    cov = 0
    for k in names:
        j = jac[k].reshape(*jac[k].shape[:2], -1)
        cov = cov + torch.einsum("nok,k,npk->nop", j, variances[k].reshape(-1), j)
    return cov


def diag_output_covariance(
    apply_fn: Any,
    params: dict[str, Tensor],
    variances: dict[str, Tensor],
    x: Tensor,
    *,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Outputs at ``params`` and ``J diag(variances) J^T`` per example.

    Parameters
    ----------
    apply_fn : FunctionalModel
        From :func:`funcbnn.functionalize`; its Linear/Conv1d/Conv2d layers take
        the structured path, every other leaf the ``vmap(jacrev)`` path.
    params : dict
        All leaves the model needs (the MAP values).
    variances : dict
        Posterior variances of the leaves that are uncertain (a subset of
        ``params``, same shapes); the other leaves count as fixed.
    x : Tensor
        Inputs with a leading batch axis.
    chunk_size : int
        Examples per pass; bounds memory at ``chunk_size x O x`` (layer width,
        or ``|W|`` for convolutions and generic leaves).

    Returns
    -------
    f : Tensor
        ``(N, *out)`` outputs at ``params`` (detached).
    cov : Tensor
        ``(N, O, O)`` with ``O`` the number of scalar outputs per example;
        differentiable in ``variances`` (so in a prior precision or noise std
        they were computed from), never in ``params``.

    Examples
    --------
    >>> import funcbnn
    >>> apply_fn, params, _ = funcbnn.functionalize(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)))
    >>> var = {k: torch.full_like(v, 0.01) for k, v in params.items()}
    >>> f, cov = diag_output_covariance(apply_fn, params, var, torch.randn(5, 3))
    >>> cov.shape
    torch.Size([5, 2, 2])
    """
    chunk_size = positive_int(chunk_size, "chunk_size")
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError("x must be a tensor with a leading batch axis")
    unknown = set(variances) - set(params)
    if unknown:
        raise ValueError(f"variances has leaves that are not in params: {sorted(unknown)}")
    for k, v in variances.items():
        if v.shape != params[k].shape:
            raise ValueError(f"variances[{k!r}] has shape {tuple(v.shape)}, expected {tuple(params[k].shape)}")
    detached = {k: v.detach() for k, v in params.items()}
    layers = structured_layers(apply_fn, set(variances)) if hasattr(apply_fn, "module") else []
    fs, covs = [], []
    for start in range(0, x.shape[0], chunk_size):
        xs = x[start : start + chunk_size]
        while True:
            try:
                # The taps need autograd even when the caller has it off (no_grad or inference_mode).
                with torch.inference_mode(False), torch.enable_grad():
                    f, cov = _structured_part(apply_fn, detached, layers, xs, _diag_weigh(variances))
                break
            except _Unstructured as err:
                layers = [layer for layer in layers if layer not in err.layers]
        covered = {n for layer in layers for n in (layer.weight, layer.bias) if n}
        generic = [k for k in variances if k not in covered]
        if generic:
            cov = cov + _generic_part(apply_fn, detached, variances, generic, xs)
        fs.append(f)
        covs.append(cov)
    return torch.cat(fs), torch.cat(covs)
