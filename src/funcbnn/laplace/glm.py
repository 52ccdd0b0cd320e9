"""The linearised network's Jacobian in pieces, and its output covariance without materialising it.

The GLM predictive (Immer et al. 2021; Daxberger et al. 2021) needs, per test
input, ``Cov[f] = J S J^T`` with ``J = d f / d theta`` at the MAP and ``S`` the
posterior covariance. Forming ``J`` costs ``N x O x P`` numbers, which for a
full network is gigabytes. For ``nn.Linear`` layers on 2-D input the
per-example Jacobian of output ``o`` in the weight is the outer product
``g_o a^T`` (``g_o`` the gradient of output ``o`` in the layer's output, ``a``
its input), so for a diagonal ``S`` with variances ``V``::

    [J S J^T]_{op} = sum_i g_{o,i} g_{p,i} (V (a * a))_i          (bias: a_j = 1)

one ``O x O`` contraction per example over the layer's *width*, never its
weights (a Kronecker ``S`` contracts the same factors in its eigenbasis,
:mod:`funcbnn.families.kron_gaussian`). The ``g_o`` come from the same zero
"tap" trick as the curvature engine: one forward and ``O`` backward passes to
the taps for the whole batch. Convolutions and Linear layers on sequences form
per-example weight Jacobians from unfolded inputs (``O x N x |W|``); any other
leaf goes through a ``vmap(jacrev)`` restricted to that leaf.

:func:`jacobian_pieces` returns those pieces (they depend on the inputs and the
mean only, so a :class:`~funcbnn.laplace.predictive.Linearization` keeps them
across hyperparameters); :func:`diag_output_covariance` weighs them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._validation import positive_int
from ..checks import check_finite
from ..model import Inputs
from ._guards import check_batched_inputs, model_call, tensor_output
from ._per_example import PerExample
from ._subset import split
from ._taps import Layer, OutsideForward, math_attention, structured_layers, tapped_forward
from .curvature import _grads_from, _unfold

__all__ = ["LayerPiece", "JacobianPieces", "jacobian_pieces", "layer_jacobian", "diag_output_covariance"]


class LayerPiece(NamedTuple):
    """One structured layer's share of the Jacobian: its input and the output gradients at its output."""

    layer: Layer
    inputs: Tensor  # (N, ...) the layer's input, detached
    grads: Tensor  # (O, N, *layer output): d f_o / d (layer output) for each of the O flattened outputs

    def is_outer_product(self) -> bool:
        """Whether each example's Jacobian is ``g_o a^T`` (a Linear layer on one input row per example)."""
        return isinstance(self.layer.module, nn.Linear) and self.inputs.dim() == 2


class JacobianPieces(NamedTuple):
    """The network's per-example Jacobian on a batch, as structured layer pieces plus dense leaf Jacobians."""

    outputs: Tensor  # (N, *out), detached
    layers: list[LayerPiece]
    generic: dict[str, Tensor]  # leaf -> (N, O, *leaf.shape)


def layer_jacobian(piece: LayerPiece) -> dict[str, Tensor]:
    """The dense per-example Jacobians ``(N, O, *leaf.shape)`` of a piece's weight (and bias)."""
    gw, gb = _grads_from(piece.layer, _unfold(piece.layer, piece.inputs), list(piece.grads))  # (N, O, ...)
    out = {piece.layer.weight: gw}
    if piece.layer.bias:
        out[piece.layer.bias] = gb
    return out


class _Unstructured(Exception):
    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers


def _structured(apply_fn: Any, params: dict[str, Tensor], layers: list[Layer], x: Tensor) -> tuple[Tensor, list[LayerPiece]]:
    """Outputs ``(N, *out)`` and one piece per structured layer (each must be called exactly once)."""
    try:
        with model_call(x, params, "x"):
            f, calls = tapped_forward(apply_fn, params, layers, x)
        f = tensor_output(f, "the Laplace predictive")
    except OutsideForward as err:  # weights read outside their layer's forward: the generic path takes them
        raise _Unstructured(err.layers) from None
    count = [0] * len(layers)
    for c in calls:
        count[c.layer] += 1
    if any(k != 1 for k in count):
        # A layer called twice (or never) has no single (input, output-gradient) pair.
        raise _Unstructured([layer for layer, k in zip(layers, count) if k != 1])
    if not layers:
        return f.detach(), []
    acts = {c.layer: c.input for c in calls}
    taps = [c.tap for c in sorted(calls, key=lambda c: c.layer)]
    flat = f.reshape(f.shape[0], -1)
    num_out = flat.shape[1]
    # Examples are independent (eval mode), so the gradient of sum_n f[n, o] in a tap is, row by
    # row, each example's own gradient of its output o.
    per_output = [
        torch.autograd.grad(flat[:, o].sum(), taps, retain_graph=o < num_out - 1, allow_unused=True)
        for o in range(num_out)
    ]
    pieces = []
    for i, layer in enumerate(layers):
        if per_output[0][i] is None:  # the layer's output never reaches f: a zero Jacobian
            grads = taps[i].detach().new_zeros(num_out, *taps[i].shape)
        else:
            grads = torch.stack([g[i] for g in per_output])
        pieces.append(LayerPiece(layer, acts[i], grads))
    return f.detach(), pieces


def _generic_jacobian(
    apply_fn: Any, params: dict[str, Tensor], names: list[str], x: Tensor, per_example: PerExample | None = None
) -> dict[str, Tensor]:
    sub, subset = split(params, names)

    def f_one(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return apply_fn(subset.merge(p), xi[None])[0].reshape(-1)

    with math_attention():
        # vmap, or a loop over examples for forwards that cannot run under it (recurrent layers, control flow)
        return (per_example or PerExample())(  # leaf: (N, O, *leaf)
            torch.func.jacrev(f_one), (None, 0), sub, x, loop_fn=torch.func.jacrev(f_one, chunk_size=1)
        )


def jacobian_pieces(
    apply_fn: Any, params: dict[str, Tensor], names: list[str], x: Tensor, per_example: PerExample | None = None
) -> JacobianPieces:
    """The per-example Jacobian of the outputs in the leaves ``names``, at ``params``, in pieces.

    Linear/Conv1d/Conv2d layers of a :class:`~funcbnn.model.FunctionalModel`
    called once per forward give a :class:`LayerPiece` (one forward and ``O``
    backward passes for the whole batch); every other leaf in ``names`` gets its
    dense Jacobian from ``vmap(jacrev)`` (``per_example``: a
    :class:`~funcbnn.laplace._per_example.PerExample` shared over chunks, so a
    forward that cannot run under ``vmap`` is tried under it once). Nothing
    carries a graph.
    """
    detached = {k: v.detach() for k, v in params.items()}
    layers = structured_layers(apply_fn, set(names)) if hasattr(apply_fn, "module") else []
    while True:
        try:
            # The taps need autograd even when the caller has it off (no_grad or inference_mode).
            with torch.inference_mode(False), torch.enable_grad():
                f, pieces = _structured(apply_fn, detached, layers, x)
            break
        except _Unstructured as err:
            layers = [layer for layer in layers if layer not in err.layers]
    covered = {n for layer in layers for n in (layer.weight, layer.bias) if n}
    generic = [k for k in names if k not in covered]
    jac = _generic_jacobian(apply_fn, detached, generic, x, per_example) if generic else {}
    return JacobianPieces(f, pieces, {k: v.detach() for k, v in jac.items()})


def _diag_weigh(piece: LayerPiece, variances: dict[str, Tensor]) -> Tensor:
    """A piece's share ``(N, O, O)`` of ``J diag(variances) J^T``."""
    layer, a, G = piece
    vw = variances[layer.weight]
    vb = variances[layer.bias] if layer.bias else None
    if piece.is_outer_product():
        u = a.square() @ vw.T  # (N, out)
        if vb is not None:
            u = u + vb
        g = G.transpose(0, 1)  # (N, O, out)
        # One (O, out) @ (out, O) product per example; einsum's contraction ran about 10x slower.
        return (g * u[:, None, :]) @ g.transpose(1, 2)
    jac = layer_jacobian(piece)
    jw = jac[layer.weight].flatten(2)  # (N, O, |W|)
    cov = (jw * vw.reshape(-1)) @ jw.transpose(1, 2)
    if vb is not None:
        jb = jac[layer.bias]  # (N, O, out)
        cov = cov + (jb * vb) @ jb.transpose(1, 2)
    return cov


def pieces_covariance(pieces: JacobianPieces, variances: dict[str, Tensor]) -> Tensor:
    """``J diag(variances) J^T`` ``(N, O, O)`` from :func:`jacobian_pieces`; differentiable in ``variances``."""
    n = pieces.outputs.shape[0]
    num_out = pieces.outputs[0].numel()
    cov = pieces.outputs.new_zeros(n, num_out, num_out)
    for piece in pieces.layers:
        cov = cov + _diag_weigh(piece, variances)
    for k, j in pieces.generic.items():
        j = j.reshape(*j.shape[:2], -1)
        cov = cov + (j * variances[k].reshape(-1)) @ j.transpose(1, 2)
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
    if not isinstance(x, (Tensor, Inputs)) or (isinstance(x, Tensor) and x.dim() == 0):
        raise ValueError("x must be a tensor with a leading batch axis (or funcbnn.model.Inputs)")
    check_batched_inputs(x, "x")
    check_finite(x, "x")
    unknown = set(variances) - set(params)
    if unknown:
        raise ValueError(f"variances has leaves that are not in params: {sorted(unknown)}")
    for k, v in variances.items():
        if v.shape != params[k].shape:
            raise ValueError(f"variances[{k!r}] has shape {tuple(v.shape)}, expected {tuple(params[k].shape)}")
    names = [k for k in params if k in variances]
    fs, covs = [], []
    per_example = PerExample()
    for start in range(0, len(x), chunk_size):
        pieces = jacobian_pieces(apply_fn, params, names, x[start : start + chunk_size], per_example)
        fs.append(pieces.outputs)
        covs.append(pieces_covariance(pieces, variances))
    return torch.cat(fs), torch.cat(covs)
