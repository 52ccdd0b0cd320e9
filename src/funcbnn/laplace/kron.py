"""Kronecker-factored (KFAC) curvature: the factors of a Kronecker Laplace posterior.

Curvature
---------
For a layer with per-example weight gradient ``sum_t g_t a_t^T`` (input rows
``a_t``, output gradients ``g_t``; ``t`` runs over sequence positions or
convolution patches), the curvature block of its parameters is approximated as

``C ~ G (x) A / M``,   ``A = sum_{n,t} a a^T``,   ``G = sum_{n,t,c} g_c g_c^T``,

with ``M`` the number of input rows (``N`` examples times positions). This is
KFAC (Martens & Grosse 2015) as "expectation of A times sum of G", the scaling
of laplace-torch (Daxberger et al. 2021); ``c`` runs over the output-Hessian
square-root columns (GGN), the observed label (EF) or sampled labels (MC-GGN).
On a single example with one position the block is exact. Convolutions use
unfolded patches, ``A`` summed over all spatial positions and ``G`` summed over
output positions (KFC, Grosse & Martens 2016); a Linear layer applied to
``(N, T, D)`` inputs treats ``T`` the same way (the "expand" convention,
Eschenhagen et al. 2023), as does a layer called several times in one forward.

Parameter ordering: a block keyed ``(weight, bias)`` covers the matrix
``[W.reshape(out, -1) | b]`` of shape ``(out, d + 1)`` flattened row-major, so
row ``o`` holds ``W[o]`` then ``b[o]`` (``A`` gets a ones column appended). A
block keyed ``(weight,)`` covers ``W.reshape(out, -1)`` row-major, one keyed
``(bias,)`` (``joint_bias=False``) covers ``b`` with ``A = [[M]]``, i.e. ``C = G``.

Posterior
---------
:func:`kron_decompose` eigendecomposes the factors once; the result is the
curvature of a :class:`funcbnn.families.KronGaussianState`, whose family
(:mod:`funcbnn.families.kron_gaussian`) holds the posterior algebra (sampling,
log-determinant, marginal variances, linearised output covariance).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor, nn

from .._validation import positive_int
from ..families.kron_gaussian import BlockKey, KronDecomposed, KronEigen
from ..likelihoods import Likelihood
from ..model import FunctionalModel
from ..checks import check_generator
from ._guards import accumulator_dtype, check_eval_normalisation, model_call
from ._taps import Layer, OutsideForward, structured_layers, tapped_forward
from .curvature import (
    _patches,
    CurvatureStats,
    Kind,
    check_data,
    check_targets,
    diag_curvature,
    tap_gradients,
    unit_likelihood,
)

__all__ = ["KronBlock", "KronCurvature", "kron_curvature", "kron_decompose"]


class KronBlock(NamedTuple):
    """Kronecker factors of one layer, summed over the data.

    Attributes
    ----------
    A : Tensor
        ``(d, d)``: input-side factor ``sum a a^T`` over all input rows (with a
        ones column last when the block holds a bias).
    G : Tensor
        ``(out, out)``: output-gradient factor ``sum g g^T``.
    num_rows : Tensor
        0-d, ``M``: the number of input rows summed into ``A``; the block is
        ``G (x) A / M``.
    """

    A: Tensor
    G: Tensor
    num_rows: Tensor


class KronCurvature(NamedTuple):
    """KFAC curvature of a model: Kronecker blocks plus a diagonal for the other leaves.

    A pytree of tensors only: ``blocks`` is keyed by the tuple of leaf names a
    block covers (``(weight, bias)``, ``(weight,)`` or ``(bias,)``), ``diag`` by
    leaf name (each value shaped like its leaf, summed over examples).
    """

    blocks: dict[BlockKey, KronBlock]
    diag: dict[str, Tensor]

    @property
    def names(self) -> tuple[str, ...]:
        """Every leaf covered, blocks first (in key order), then the diagonal leaves."""
        return tuple(n for key in self.blocks for n in key) + tuple(self.diag)


# --- curvature ---------------------------------------------------------------------------------


def _input_rows(layer: Layer, a: Tensor) -> Tensor:
    """The layer's input as rows ``(M, d)``: one per example and position (unfolded for convs)."""
    mod = layer.module
    if isinstance(mod, nn.Linear):
        if a.dim() < 2:
            raise ValueError(
                f"layer {layer.weight!r}: Linear inputs must carry a batch axis, got shape {tuple(a.shape)}"
            )
        return a.reshape(-1, a.shape[-1])
    if isinstance(mod, nn.Conv1d):
        if a.dim() != 3:
            raise ValueError(f"layer {layer.weight!r}: Conv1d inputs must be (N, C, L), got {tuple(a.shape)}")
        a = a.unsqueeze(-2)
        kernel, dil = (1, *mod.kernel_size), (1, *mod.dilation)
        pad, stride = (0, *mod.padding), (1, *mod.stride)
    else:
        if a.dim() != 4:
            shape = tuple(a.shape)
            raise ValueError(f"layer {layer.weight!r}: Conv2d inputs must be (N, C, H, W), got {shape}")
        kernel, dil, pad, stride = mod.kernel_size, mod.dilation, mod.padding, mod.stride
    rows = _patches(a, kernel, dil, pad, stride, positions_first=True)  # (N, L, C*kh*kw)
    return rows.reshape(-1, rows.shape[-1])


def _grad_rows(layer: Layer, g: Tensor) -> Tensor:
    """Output gradients ``(K, *tap.shape)`` as rows ``(K * M, out)``."""
    if isinstance(layer.module, nn.Linear):
        return g.reshape(-1, g.shape[-1])
    out = g.shape[2]
    return g.reshape(-1, out, g[0, 0, 0].numel()).transpose(1, 2).reshape(-1, out)


def _add_gram_(out: Tensor, x: Tensor) -> None:
    """``out += x^T x``, computing the symmetric result's upper blocks only.

    Factors are grams of tall matrices; on wide ones (``d >= 256``) the columns
    are cut into ``k >= 2`` panels of about 768 and only the ``k (k + 1) / 2``
    panel products on and above the diagonal are formed (58% of the work for
    the curvature benchmark's 4608-wide input factor, 75% for ``k = 2``); the
    lower blocks are their transposes.
    """
    d = x.shape[1]
    if d < 256:
        out.addmm_(x.T, x)
        return
    k = max(2, math.ceil(d / 768))
    edges = [round(i * d / k) for i in range(k + 1)]
    for i in range(k):
        a, b = edges[i], edges[i + 1]
        left = x[:, a:b]
        out[a:b, a:b].addmm_(left.T, left)
        for j in range(i + 1, k):
            c, e = edges[j], edges[j + 1]
            block = left.T @ x[:, c:e]
            out[a:b, c:e] += block
            out[c:e, a:b] += block.T


def _kron_batch(
    apply_fn: FunctionalModel,
    params: dict[str, Tensor],
    layers: list[Layer],
    x: Any,
    y: Tensor,
    likelihood: Likelihood,
    kind: Kind,
    num_mc: int,
    generator: torch.Generator | None,
    A: list[Tensor],
    G: list[Tensor],
    rows: list[int],
    batch: int = 0,
) -> Tensor:
    # A layer called twice in one forward shares its weight across calls, which
    # KFAC-expand treats as extra positions.
    with model_call(x, params, f"x of data batch {batch}"):
        f, calls = tapped_forward(apply_fn, params, layers, x)
    f = check_targets(likelihood, f, y, batch)
    loss = likelihood.nll(f.detach(), y).sum()
    if not calls:  # no structured layer ran: nothing to accumulate
        return loss
    grads = tap_gradients(f, y, [tap for _, _, tap in calls], likelihood, kind, num_mc, generator)
    with torch.no_grad():
        for (i, a, _), g in zip(calls, grads):
            layer = layers[i]
            ar = _input_rows(layer, a).to(A[i].dtype)
            d = ar.shape[1]
            # [a | 1] [a | 1]^T blockwise, without materialising the ones column.
            _add_gram_(A[i][:d, :d], ar)
            if layer.bias is not None:
                col = ar.sum(0)
                A[i][:d, d] += col
                A[i][d, :d] += col
                A[i][d, d] += ar.shape[0]
            rows[i] += ar.shape[0]
            for column in g or ():  # one gram per column: no (K * M, out) copy of the rows
                _add_gram_(G[i], _grad_rows(layer, column[None]).to(G[i].dtype))
    return loss


def _kron_pass(
    apply_fn: FunctionalModel,
    params: dict[str, Tensor],
    batches: list,
    lik: Likelihood,
    layers: list[Layer],
    kind: Kind,
    num_mc: int,
    generator: torch.Generator | None,
) -> tuple[list[Tensor], list[Tensor], list[int], CurvatureStats | None]:
    A, G, rows = [], [], [0] * len(layers)
    for layer in layers:
        w = params[layer.weight]
        d = w[0].numel() + (layer.bias is not None)
        # float16/bfloat16 models sum in float32 (see _guards.LOW_PRECISION), cast back in kron_curvature.
        A.append(torch.zeros(d, d, dtype=accumulator_dtype(w.dtype), device=w.device))
        G.append(torch.zeros(w.shape[0], w.shape[0], dtype=accumulator_dtype(w.dtype), device=w.device))
    if not layers:
        return A, G, rows, None
    loss, num_data, num_outputs = None, 0, 0
    with apply_fn._lock:  # hooks live on the shared shell
        for i, (x, y) in enumerate(batches):
            batch_loss = _kron_batch(apply_fn, params, layers, x, y, lik, kind, num_mc, generator, A, G, rows, i)
            loss = batch_loss if loss is None else loss + batch_loss
            num_data += y.shape[0]
            num_outputs += lik.num_outputs(y)
    return A, G, rows, CurvatureStats(loss.detach(), num_data, num_outputs)


def kron_curvature(
    apply_fn: FunctionalModel,
    params: dict[str, Tensor],
    data: Iterable,
    likelihood: str | Likelihood,
    *,
    kind: Kind = "ggn",
    num_mc: int = 1,
    generator: torch.Generator | None = None,
    subset: Iterable[str] | None = None,
    joint_bias: bool = True,
    chunk_size: int = 32,
) -> tuple[KronCurvature, CurvatureStats]:
    """KFAC factors of every Linear/Conv1d/Conv2d layer, and a diagonal for the other leaves.

    See the module docstring for the conventions: block ``~ G (x) A / M``,
    parameter order ``[W.reshape(out, -1) | b]`` row-major, convolutions and
    sequence inputs summed over positions.

    Parameters
    ----------
    apply_fn : FunctionalModel
        From :func:`funcbnn.functionalize` (the factors come from hooks on its module).
    params : dict[str, Tensor]
        Where to evaluate (usually the MAP): every trainable leaf of the model.
    data : iterable of (x, y)
        Batches (a DataLoader, a list of pairs, or one ``(x, y)`` pair).
    likelihood : str or Likelihood
        Gaussian curvature is taken at noise std 1 (rescale with ``scale``).
    kind : {"ggn", "ef", "mc_ggn"}
        Exact GGN (one column per output-Hessian square-root column), empirical
        Fisher, or GGN with ``num_mc`` sampled labels per example.
    num_mc : int
        Sampled labels per example for ``"mc_ggn"``.
    generator : torch.Generator, optional
        Label sampling for ``"mc_ggn"`` (the diagonal leaves draw their own labels after).
    subset : iterable of str, optional
        Leaves to cover (default: all of ``params``). A layer whose weight is in
        but whose bias is out falls back to the diagonal.
    joint_bias : bool
        One block for ``[W | b]`` (default, with the weight-bias cross terms), or
        separate ``(weight,)`` and ``(bias,)`` blocks as in laplace-torch.
    chunk_size : int
        Examples per vmapped call for the diagonal leaves.

    Returns
    -------
    (KronCurvature, CurvatureStats)

    Raises
    ------
    TypeError
        If ``apply_fn`` is not a :class:`~funcbnn.model.FunctionalModel`.
    ValueError
        For an unknown ``kind``, empty data, or ``subset`` names that are not leaves.

    Examples
    --------
    >>> from funcbnn import functionalize
    >>> apply_fn, params, _ = functionalize(nn.Linear(3, 2))
    >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    >>> curv, stats = kron_curvature(apply_fn, params, data, "categorical")
    >>> curv.blocks["weight", "bias"].A.shape, curv.blocks["weight", "bias"].G.shape
    (torch.Size([4, 4]), torch.Size([2, 2]))
    """
    if kind not in ("ggn", "ef", "mc_ggn"):
        raise ValueError(f"kind must be 'ggn', 'ef' or 'mc_ggn', got {kind!r}")
    positive_int(num_mc, "num_mc")
    positive_int(chunk_size, "chunk_size")
    check_generator(generator)
    if not isinstance(apply_fn, FunctionalModel):
        raise TypeError(
            f"apply_fn must be a FunctionalModel from funcbnn.functionalize, got {type(apply_fn).__name__}"
        )
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of tensors, got {type(params).__name__}")
    check_eval_normalisation(apply_fn, "kron_curvature")
    lik = unit_likelihood(likelihood)
    batches = check_data(data)
    active = set(params) if subset is None else set(subset)
    if not active <= set(params):
        raise ValueError(f"subset names {sorted(active - set(params))} are not leaves of params")
    if not active:
        raise ValueError("subset is empty: nothing to compute")
    layers = structured_layers(apply_fn, active)
    while True:
        try:
            A, G, rows, stats = _kron_pass(apply_fn, params, batches, lik, layers, kind, num_mc, generator)
            break
        except OutsideForward as err:
            # Weights read outside their layer's forward (attention's out_proj) get the diagonal instead.
            layers = [layer for layer in layers if layer not in err.layers]
    covered = {n for layer in layers for n in (layer.weight, layer.bias) if n}
    diag_names = [k for k in params if k in active and k not in covered]

    diag: dict[str, Tensor] = {}
    if diag_names:
        diag, diag_stats = diag_curvature(
            apply_fn, params, batches, lik, kind=kind, num_mc=num_mc, generator=generator,
            chunk_size=chunk_size, subset=diag_names,
        )
        stats = stats or diag_stats

    blocks: dict[BlockKey, KronBlock] = {}
    for i, layer in enumerate(layers):
        dtype = params[layer.weight].dtype
        A[i], G[i] = A[i].to(dtype), G[i].to(dtype)
        m = torch.tensor(float(rows[i]), dtype=A[i].dtype, device=A[i].device)
        if layer.bias is None:
            blocks[(layer.weight,)] = KronBlock(A[i], G[i], m)
        elif joint_bias:
            blocks[(layer.weight, layer.bias)] = KronBlock(A[i], G[i], m)
        else:
            blocks[(layer.weight,)] = KronBlock(A[i][:-1, :-1].clone(), G[i], m)
            blocks[(layer.bias,)] = KronBlock(A[i][-1:, -1:].clone(), G[i].clone(), m)
    return KronCurvature(blocks, diag), stats


def kron_decompose(curv: KronCurvature) -> KronDecomposed:
    """Eigendecompose every block's ``A / M`` and ``G`` once (clamping round-off negatives to 0).

    The decomposition is data, not a function of any hyperparameter: it is
    computed without gradients once and becomes the ``curvature`` of a
    :class:`funcbnn.families.KronGaussianState`, which every prior precision
    and noise scale reuses.
    """
    if not isinstance(curv, KronCurvature):
        raise TypeError(f"curv must be a KronCurvature from kron_curvature, got {type(curv).__name__}")
    blocks = {}
    with torch.no_grad():
        for key, blk in curv.blocks.items():
            # clamp: a layer the forward never called has A = 0 and no rows.
            # float16/bfloat16 have no eigh: decompose in float32 and cast back.
            work = accumulator_dtype(blk.A.dtype)
            a, U = torch.linalg.eigh((blk.A.to(work) / blk.num_rows.to(work).clamp(min=1)))
            g, V = torch.linalg.eigh(blk.G.to(work))
            blocks[key] = KronEigen(*(t.to(blk.A.dtype) for t in (a.clamp(min=0), U, g.clamp(min=0), V)))
    return KronDecomposed(blocks, {k: v.detach() for k, v in curv.diag.items()})
