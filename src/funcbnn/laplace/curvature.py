"""Per-example curvature: diagonal empirical Fisher and GGN, fast.

Everything here sums a quantity over *examples*, each from the gradient of that
example's own NLL (Daxberger et al. 2021, "Laplace Redux"):

``ef``
    empirical Fisher ``sum_n g_n g_n^T`` with ``g_n = d nll(f(x_n), y_n) / d theta``.
``ggn``
    generalised Gauss-Newton ``sum_n J_n^T H_n J_n`` with ``H_n`` the Hessian of
    the NLL in the outputs, exact through one square root ``H_n = L_n L_n^T``
    (one backward per output dimension).
``mc_ggn``
    the same with sampled labels: ``E_y[g_n(y) g_n(y)^T]`` by Monte Carlo.

Two engines compute them:

*Structured* (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``): one forward with zero
"tap" tensors added to each layer's output and its input kept, one backward
with respect to the taps only (no weight gradients), and the per-example weight
gradients' squares formed from inputs and output gradients. A Linear weight's
per-example gradient is the outer product ``g_n a_n^T``, so its squares sum as
``(g^2)^T (a^2)`` without ever forming one per-example gradient.

*Generic* (any leaf): chunked ``vmap`` of ``grad`` / ``jacrev`` over examples,
accumulating squares chunk by chunk; it never holds N x P numbers. Leaves the
structured engine does not know (norm layers, embeddings, tied weights) take
this path within the same model.

Regression curvature is computed at noise std 1; :mod:`funcbnn.laplace.state`
rescales it (GGN by ``sigma^-2``, EF by ``sigma^-4``) so sigma can be tuned.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Literal, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import positive_int
from ..checks import NonFiniteError, check_finite, check_generator
from ..likelihoods import Likelihood, get_likelihood
from ..model import FunctionalModel
from ._guards import (
    LOW_PRECISION, accumulator_dtype, check_batched_inputs, check_eval_normalisation, model_call, tensor_output,
)
from ._per_example import PerExample
from ._subset import Subset, split
from ._taps import Layer, OutsideForward, math_attention, structured_layers, tapped_forward

__all__ = ["CurvatureStats", "diag_curvature", "dense_curvature", "output_hessian_sqrt", "check_data", "unit_likelihood"]

Kind = Literal["ggn", "ef", "mc_ggn"]


class CurvatureStats(NamedTuple):
    """Data statistics gathered in the same pass.

    ``loss`` is the summed NLL at the given params (at noise std 1 for the
    Gaussian likelihood), ``num_data`` the number of examples and
    ``num_outputs`` the number of scalar outputs (``N * D``).
    """

    loss: Tensor
    num_data: int
    num_outputs: int


def unit_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """The likelihood with Gaussian noise fixed at 1 (curvature is rescaled later by ``sigma^-2``)."""
    lik = get_likelihood(likelihood)
    return lik._replace(sigma=1.0, nll=get_likelihood("gaussian", sigma=1.0).nll) if lik.sigma is not None else lik


def output_hessian_sqrt(likelihood: Likelihood, outputs: Tensor) -> Tensor:
    """Columns ``V`` with ``sum_c V[c] V[c]^T = H``, the NLL's Hessian in the outputs (at unit noise).

    Returns a tensor of shape ``(K, *outputs.shape)``: ``K`` cotangents, each
    shaped like the outputs; the likelihood's ``hessian_sqrt`` (categorical:
    ``sqrt(p_c) (e_c - p)``; gaussian: unit vectors; bernoulli: ``sqrt(p (1 - p))``;
    heteroscedastic Gaussian: the Fisher in (mean, log-variance)).
    """
    return likelihood.hessian_sqrt(outputs.detach())


def ggn_columns(likelihood: Likelihood, outputs: Tensor) -> Tensor:
    """:func:`output_hessian_sqrt` with numerically zero directions dropped: ``(K', *outputs.shape)``, ``K' <= K``.

    The GGN costs one backward pass and one per-example weight product per
    column, so columns that add nothing are worth removing. The softmax
    Hessian ``diag(p) - p p^T`` has rank ``C - 1`` (``H 1 = 0``) but ``C``
    columns ``sqrt(p_c) (e_c - p)``: with ``V`` an example's ``O x K``
    columns, ``V W_r`` (``W_r`` the eigenvectors of ``V^T V`` with the ``r``
    largest eigenvalues) has the same ``V W_r W_r^T V^T = V V^T`` whenever the
    other eigenvalues vanish, so the GGN is unchanged up to round-off. ``r``
    is the largest numerical rank over the batch (eigenvalues above
    ``K eps`` of each example's largest); nothing is dropped for full-rank
    Hessians (Gaussian), single columns (Bernoulli) or more than 64 columns.
    """
    V = output_hessian_sqrt(likelihood, outputs)
    k, n = V.shape[:2]
    flat = V.reshape(k, n, -1)
    if k < 2 or k > 64:
        return V
    gram = torch.einsum("kno,jno->nkj", flat, flat)  # V^T V per example, (N, K, K)
    if gram.dtype in LOW_PRECISION:  # no float16/bfloat16 eigh: decompose in float32, cast back
        evals, evecs = torch.linalg.eigh(gram.float())
        evecs = evecs.to(gram.dtype)
    else:
        evals, evecs = torch.linalg.eigh(gram)  # ascending
    tol = k * torch.finfo(evals.dtype).eps * evals[:, -1:].clamp_min(torch.finfo(evals.dtype).tiny)
    rank = int((evals > tol).sum(-1).max()) if n else k
    if rank >= k:
        return V
    rank = max(rank, 1)
    reduced = torch.einsum("kno,nkr->rno", flat, evecs[:, :, k - rank :])
    return reduced.reshape(rank, *V.shape[1:])


def _sample_targets(likelihood: Likelihood, outputs: Tensor, generator: torch.Generator | None) -> Tensor:
    return likelihood.sample_targets(outputs.detach(), generator)


class _Batches(list):
    """Batches :func:`check_data` has already checked (an inner engine call does not check them again)."""


def check_data(data: Any) -> list[tuple[Any, Tensor]]:
    """Materialise an iterable of ``(x, y)`` batches, rejecting empty, malformed or non-finite data early.

    Each batch's targets must be a tensor with a leading batch axis; inputs and
    targets are checked for NaN and inf (:func:`funcbnn.checks.check_finite`,
    off under ``set_finite_checks(False)``), naming the batch.
    """
    if isinstance(data, _Batches):
        return data
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor) and not isinstance(data[0], (tuple, list)):
        data = [data]  # one (x, y) batch; x a tensor or several inputs (funcbnn.model.Inputs)
    try:
        batches = list(data)
    except TypeError:
        raise TypeError(f"data must be an iterable of (x, y) batches (e.g. a DataLoader), got {type(data).__name__}") from None
    if not batches:
        raise ValueError("data is empty: the loader yielded no batches")
    for i, batch in enumerate(batches):
        check_batch(batch, i, finite=False)
    try:
        check_finite(batches, "data")  # one device sync for every batch
    except NonFiniteError:
        for i, (x, y) in enumerate(batches):  # name the batch and the tensor
            check_finite(x, f"data batch {i} inputs x")
            check_finite(y, f"data batch {i} targets y")
    return _Batches(tuple(b) for b in batches)


def check_batch(batch: Any, i: int, *, finite: bool = True) -> None:
    """Raise unless ``batch`` is an ``(x, y)`` pair with tensor targets (and, with ``finite``, finite values)."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(f"data batch {i} must be an (x, y) pair, got {type(batch).__name__}")
    x, y = batch
    if not isinstance(y, Tensor) or y.dim() == 0:
        what = "a 0-d tensor" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"data batch {i}: targets y must be a tensor with a leading batch axis, got {what}")
    if y.shape[0] == 0:
        raise ValueError(f"data batch {i} has no examples (targets of shape {tuple(y.shape)}); leave empty batches out")
    check_batched_inputs(x, f"data batch {i} inputs x", y.shape[0])
    if finite:
        check_finite(x, f"data batch {i} inputs x")
        check_finite(y, f"data batch {i} targets y")


def check_targets(likelihood: Likelihood, f: Any, y: Tensor, i: int) -> Tensor:
    """The outputs ``f`` of batch ``i`` if they are a tensor on the targets' device that the likelihood accepts with ``y``."""
    f = tensor_output(f)
    if y.device != f.device:
        raise ValueError(
            f"data batch {i}: targets y are on {y.device}, the model's outputs on {f.device}; move y there too"
        )
    likelihood.check(f, y)
    return f


def first_forward(apply_fn: Any, params: Any, x: Any, i: int) -> Tensor:
    """One forward of batch ``i`` without gradients, its errors naming the input (``_guards.model_call``)."""
    with model_call(x, params, f"x of data batch {i}"), torch.no_grad():
        f = apply_fn(optree.tree_map(lambda t: t.detach(), params), x)
    return tensor_output(f)


# --- the structured engine -------------------------------------------------------------------


def _unfold(layer: Layer, a: Tensor) -> Tensor:
    """The layer's input as rows the weight multiplies: ``(N, T, in)`` for Linear, ``(N, K, L)`` patches for conv."""
    mod = layer.module
    n = a.shape[0]
    if isinstance(mod, nn.Linear):
        return a.reshape(n, -1, a.shape[-1])
    if isinstance(mod, nn.Conv1d):
        a = a.unsqueeze(-2)
        kernel, dil, pad, stride = (1, *mod.kernel_size), (1, *mod.dilation), (0, *mod.padding), (1, *mod.stride)
    else:
        kernel, dil, pad, stride = mod.kernel_size, mod.dilation, mod.padding, mod.stride
    if a.dim() == 3:  # unbatched conv input is not per-example data
        raise ValueError("convolution inputs must carry a batch axis")
    return _patches(a, kernel, dil, pad, stride)


def _patches(a: Tensor, kernel, dilation, padding, stride, *, positions_first: bool = False) -> Tensor:
    """``F.unfold`` of a 4-D input, ``(N, C*kh*kw, L)`` (or ``(N, L, C*kh*kw)`` with
    ``positions_first``), from strided views and one copy.

    ``F.unfold``'s CPU kernel loops over the batch and ran about 2x slower than this on the
    curvature benchmark's convolutions.
    """
    if any(padding):
        a = F.pad(a, (padding[1], padding[1], padding[0], padding[0]))
    span_h, span_w = dilation[0] * (kernel[0] - 1) + 1, dilation[1] * (kernel[1] - 1) + 1
    p = a.unfold(2, span_h, stride[0]).unfold(3, span_w, stride[1])  # (N, C, Ho, Wo, span_h, span_w)
    if dilation[0] > 1 or dilation[1] > 1:
        p = p[..., :: dilation[0], :: dilation[1]]
    n, c, ho, wo = p.shape[:4]
    if positions_first:
        return p.permute(0, 2, 3, 1, 4, 5).reshape(n, ho * wo, c * kernel[0] * kernel[1])
    return p.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kernel[0] * kernel[1], ho * wo)


def _grads_from(layer: Layer, rows: Tensor, cols: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Per-example weight and bias gradients ``(N, C, *W.shape)``, ``(N, C, out)`` for the output
    gradients ``cols`` (``C`` tensors shaped like the layer's output, sharing one unfold ``rows``)."""
    n, c = rows.shape[0], len(cols)
    # Examples as the bmm batch and columns folded into the rows: one copy of the columns into
    # (N, C, out, positions), never one of ``rows`` per column.
    if isinstance(layer.module, nn.Linear):
        gt = torch.stack([g.reshape(n, -1, g.shape[-1]).transpose(1, 2) for g in cols], 1)  # (N, C, out, T)
        out = gt.shape[2]
        gw = torch.bmm(gt.reshape(n, c * out, gt.shape[-1]), rows).reshape(n, c, out, rows.shape[-1])
        return gw, (gt.sum(-1) if layer.bias else None)
    gt = torch.stack([g.reshape(n, g.shape[1], -1) for g in cols], 1)  # (N, C, O, L)
    o = gt.shape[2]
    gw = torch.bmm(gt.reshape(n, c * o, gt.shape[-1]), rows.transpose(1, 2)).reshape(n, c, *layer.module.weight.shape)
    return gw, (gt.sum(-1) if layer.bias else None)


def _per_example_grads(layer: Layer, a: Tensor, g: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Per-example weight and bias gradients ``(N, *W.shape)``, ``(N, out)`` for sequence/conv layers."""
    gw, gb = _grads_from(layer, _unfold(layer, a), [g])
    return gw[:, 0], (None if gb is None else gb[:, 0])


# Floats of per-example weight gradients held at once (all columns of a chunk of examples): ~4 MiB,
# so each chunk's product, squares and sum stay in cache instead of streaming a (C, N, |W|) tensor.
_GRAD_BUDGET = 1 << 20


def _accumulate(layer: Layer, acts: list[Tensor], gs: list[list[Tensor]], out: dict[str, Tensor]) -> None:
    """Add ``sum_c sum_n (per-example gradient)^2`` for one layer into ``out``.

    ``acts`` holds the layer's input for each call in the forward pass and ``gs`` the output
    gradients of each call, one tensor per column ``c`` shaped like that call's output: a
    layer called twice (a reused module) has a per-example gradient that is the sum over its
    calls, squared only after summing.
    """
    if len(acts) == 1 and isinstance(layer.module, nn.Linear) and acts[0].dim() == 2:
        # Outer-product gradients: sum over columns of g^2 first, then one matmul.
        g2 = gs[0][0].square()
        for g in gs[0][1:]:
            g2.addcmul_(g, g)
        out[layer.weight] += g2.T @ acts[0].square()
        if layer.bias:
            out[layer.bias] += g2.sum(0)
        return
    # Unfold each call once; push all columns of a chunk of examples through one batched product,
    # square in place and reduce, chunk by chunk.
    rows = [_unfold(layer, a) for a in acts]
    num_cols, n = len(gs[0]), acts[0].shape[0]
    step = max(1, _GRAD_BUDGET // (num_cols * layer.module.weight.numel()))
    for n0 in range(0, n, step):
        gw_sum = gb_sum = None
        for r, cols in zip(rows, gs):
            gw, gb = _grads_from(layer, r[n0 : n0 + step], [g[n0 : n0 + step] for g in cols])
            gw_sum = gw if gw_sum is None else gw_sum + gw
            if gb is not None:
                gb_sum = gb if gb_sum is None else gb_sum + gb
        out[layer.weight] += gw_sum.square_().sum((0, 1))
        if layer.bias:
            out[layer.bias] += gb_sum.square_().sum((0, 1))


def tap_gradients(
    f: Tensor,
    y: Tensor,
    taps: list[Tensor],
    likelihood: Likelihood,
    kind: Kind,
    num_mc: int,
    generator: torch.Generator | None,
) -> list[list[Tensor] | None]:
    """Per tap, the output gradients of every column: a list of tensors shaped like the tap (None: unused tap).

    ``"ef"``: one column, the gradient of the observed labels' NLL; ``"ggn"``: one per
    :func:`ggn_columns` column; ``"mc_ggn"``: one per sampled label set, scaled by
    ``num_mc^-1/2``. Columns run as separate ordinary backward passes: measured on the
    curvature benchmark's CNN, a loop of ``K`` backwards was 2-3x faster than one
    ``is_grads_batched`` (vmapped) backward, whose convolution and ReLU batching rules copy
    and expand, and on par for MLPs.
    """
    if not taps:  # no tapped layer ran on this batch (a branch skipped it): nothing to differentiate
        return []
    if kind == "ef":
        grads = torch.autograd.grad(likelihood.nll(f, y).sum(), taps, allow_unused=True)
        return [None if g is None else [g] for g in grads]
    if kind == "ggn":
        V = ggn_columns(likelihood, f)
        columns = [torch.autograd.grad(f, taps, grad_outputs=V[c], retain_graph=True, allow_unused=True) for c in range(V.shape[0])]
    else:
        # Sampled labels enter only through d nll / d f: draw them on a detached copy of the outputs,
        # then push each cotangent through the network.
        scale = 1.0 / math.sqrt(num_mc)
        columns = []
        for _ in range(num_mc):
            f_leaf = f.detach().requires_grad_(True)
            with torch.enable_grad():
                y_hat = _sample_targets(likelihood, f_leaf, generator)
                cot = torch.autograd.grad(likelihood.nll(f_leaf, y_hat).sum(), f_leaf)[0] * scale
            columns.append(torch.autograd.grad(f, taps, grad_outputs=cot, retain_graph=True, allow_unused=True))
    return [None if per_tap[0] is None else list(per_tap) for per_tap in zip(*columns)]


def _structured_batch(
    apply_fn: FunctionalModel,
    params: dict[str, Tensor],
    layers: list[Layer],
    x: Any,
    y: Tensor,
    likelihood: Likelihood,
    kind: Kind,
    num_mc: int,
    generator: torch.Generator | None,
    out: dict[str, Tensor],
    i: int = 0,
) -> Tensor:
    with model_call(x, params, f"x of data batch {i}"):
        f, calls = tapped_forward(apply_fn, params, layers, x)
    f = check_targets(likelihood, f, y, i)
    loss = likelihood.nll(f.detach(), y).sum()
    grads = tap_gradients(f, y, [c.tap for c in calls], likelihood, kind, num_mc, generator)
    for i, layer in enumerate(layers):
        # A call whose output never reaches f (an auxiliary head) has no gradient: it adds zero.
        mine = [j for j, c in enumerate(calls) if c.layer == i and grads[j] is not None]
        if mine:  # a layer the forward never called has zero gradient
            _accumulate(layer, [calls[j].input for j in mine], [grads[j] for j in mine], out)
    return loss


# --- the generic engine ----------------------------------------------------------------------


def _generic_batch(
    apply_fn: Any,
    sub: Any,
    subset: Subset,
    x: Tensor,
    y: Tensor,
    likelihood: Likelihood,
    kind: Kind,
    num_mc: int,
    generator: torch.Generator | None,
    chunk_size: int,
    out: Any,
    per_example: PerExample | None = None,
) -> None:
    """Squares of per-example gradients of the leaves in ``sub``; ``subset`` holds the other leaves.

    ``per_example`` maps over the examples of a chunk (``vmap``, or a loop for forwards that
    cannot run under it: :mod:`funcbnn.laplace._per_example`).
    """
    per_example = PerExample() if per_example is None else per_example

    def f_one(p, xi):
        return apply_fn(subset.merge(p), xi[None])[0]

    def nll_one(p, xi, yi):
        return likelihood.nll(apply_fn(subset.merge(p), xi[None]), yi[None]).sum()

    n = len(x)  # a tensor's or an Inputs' batch size
    for start in range(0, n, chunk_size):
        xs, ys = x[start : start + chunk_size], y[start : start + chunk_size]
        if kind == "ef":
            with math_attention():
                g = per_example(torch.func.grad(nll_one), (None, 0, 0), sub, xs, ys)
            squares = optree.tree_map(lambda t: t.square().sum(0), g)
        elif kind == "ggn":
            with math_attention():
                jac = per_example(  # (n, *out, *leaf)
                    torch.func.jacrev(f_one), (None, 0), sub, xs, loop_fn=torch.func.jacrev(f_one, chunk_size=1)
                )
            with torch.no_grad():
                # One batched forward (examples are independent): no vmap fallback for fused kernels.
                f = apply_fn(subset.merge(sub), xs)
                V = ggn_columns(likelihood, f)  # (K, n, *out)
            k = V.shape[0]
            Vf = V.reshape(k, V.shape[1], -1)

            out_ndim = f.dim() - 1

            def contract(j: Tensor) -> Tensor:
                jf = j.reshape(j.shape[0], Vf.shape[2], -1)  # (n, outputs, leaf size)
                return torch.einsum("kno,nop->knp", Vf, jf).square().sum((0, 1)).reshape(j.shape[1 + out_ndim :])

            squares = optree.tree_map(contract, jac)
        else:
            with torch.no_grad():
                f = apply_fn(subset.merge(sub), xs)
            squares = None
            for _ in range(num_mc):
                y_hat = _sample_targets(likelihood, f, generator)
                with math_attention():
                    g = per_example(torch.func.grad(nll_one), (None, 0, 0), sub, xs, y_hat)
                sq = optree.tree_map(lambda t: t.square().sum(0) / num_mc, g)
                squares = sq if squares is None else optree.tree_map(torch.add, squares, sq)
        optree.tree_map_(lambda acc, s: acc.add_(s.detach()), out, squares)


# --- entry point -------------------------------------------------------------------------------


def diag_curvature(
    apply_fn: Any,
    params: dict[str, Tensor],
    data: Iterable,
    likelihood: str | Likelihood,
    *,
    kind: Kind = "ggn",
    method: Literal["auto", "structured", "generic"] = "auto",
    num_mc: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int = 32,
    subset: Iterable[str] | None = None,
) -> tuple[dict[str, Tensor], CurvatureStats]:
    """Diagonal of the per-example curvature summed over all examples in ``data``.

    Parameters
    ----------
    apply_fn : callable
        ``apply_fn(params, x)``; the structured engine needs a
        :class:`funcbnn.model.FunctionalModel` (from ``functionalize``), any other
        callable uses the generic engine.
    params : dict[str, Tensor]
        Where to evaluate (usually the MAP): every trainable leaf of the model.
    data : iterable of (x, y)
        Batches (a DataLoader, a list of pairs, or one ``(x, y)`` pair).
    likelihood : str or Likelihood
    kind : {"ggn", "ef", "mc_ggn"}
        Exact GGN (default, as laplace-torch), empirical Fisher, or GGN with
        ``num_mc`` sampled labels per example.
    method : {"auto", "structured", "generic"}
        ``"auto"`` uses the structured engine for every Linear/Conv layer it can
        and the generic one for the other leaves; ``"generic"`` forces vmap.
    generator : torch.Generator, optional
        Label sampling for ``"mc_ggn"``. Each engine draws ``num_mc`` label sets per
        batch (per chunk on the generic path), so with ``chunk_size`` at least the batch
        size, ``method="structured"`` and ``"generic"`` give the same numbers for the
        same seed. Under ``"auto"`` the two engines' leaves use separate draws.
    chunk_size : int
        Examples per vmapped call on the generic path.
    subset : iterable of str, optional
        Names of the leaves to compute (default: all of ``params``).

    Returns
    -------
    (diag, stats)
        ``diag`` maps each computed leaf name to its diagonal (the leaf's
        shape); ``stats`` is a :class:`CurvatureStats`.

    Examples
    --------
    >>> from funcbnn import functionalize
    >>> apply_fn, params, _ = functionalize(nn.Linear(3, 2))
    >>> diag, stats = diag_curvature(apply_fn, params, (torch.randn(8, 3), torch.randint(0, 2, (8,))), "categorical")
    >>> diag["weight"].shape, stats.num_data
    (torch.Size([2, 3]), 8)
    """
    if kind not in ("ggn", "ef", "mc_ggn"):
        raise ValueError(f"kind must be 'ggn', 'ef' or 'mc_ggn', got {kind!r}")
    if method not in ("auto", "structured", "generic"):
        raise ValueError(f"method must be 'auto', 'structured' or 'generic', got {method!r}")
    positive_int(num_mc, "num_mc")
    positive_int(chunk_size, "chunk_size")
    check_generator(generator)
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of tensors, got {type(params).__name__}")
    check_eval_normalisation(apply_fn, "diag_curvature")
    lik = unit_likelihood(likelihood)
    batches = check_data(data)
    active = set(params) if subset is None else set(subset)
    if not active <= set(params):
        raise ValueError(f"subset names {sorted(active - set(params))} are not leaves of params")
    if not active:
        raise ValueError("subset is empty: nothing to compute")
    if method != "generic" and isinstance(apply_fn, FunctionalModel):
        layers = structured_layers(apply_fn, active)
    else:
        if method == "structured":
            raise ValueError("method='structured' needs apply_fn from funcbnn.functionalize")
        layers = []
    # One structured pass registers hooks on the shared shell: hold its lock throughout.
    ctx = apply_fn._lock if isinstance(apply_fn, FunctionalModel) else contextlib.nullcontext()
    with ctx:
        while True:
            try:
                return _diag_pass(apply_fn, params, batches, lik, layers, active, method, kind, num_mc, generator, chunk_size)
            except OutsideForward as err:
                # Weights read outside their layer's forward (attention's out_proj): the generic engine takes them.
                if method == "structured":
                    names = sorted(n for layer in err.layers for n in (layer.weight, layer.bias) if n)
                    raise ValueError(
                        f"method='structured' cannot handle leaves {names}: the model reads them outside their "
                        "layer's forward (e.g. nn.MultiheadAttention's out_proj); use method='auto'"
                    ) from None
                layers = [layer for layer in layers if layer not in err.layers]


def _diag_pass(
    apply_fn: Any,
    params: dict[str, Tensor],
    batches: list,
    lik: Likelihood,
    layers: list[Layer],
    active: set[str],
    method: str,
    kind: Kind,
    num_mc: int,
    generator: torch.Generator | None,
    chunk_size: int,
) -> tuple[dict[str, Tensor], CurvatureStats]:
    covered = {n for layer in layers for n in (layer.weight, layer.bias) if n}
    if method == "structured" and active - covered:
        raise ValueError(f"method='structured' cannot handle leaves {sorted(active - covered)}; use method='auto'")
    generic_names = active - covered
    sub, subset = split(params, generic_names)

    # float16/bfloat16 models sum in float32 (see _guards.LOW_PRECISION) and cast back at the end.
    out = {k: torch.zeros_like(v, dtype=accumulator_dtype(v.dtype)) for k, v in params.items() if k in covered}
    generic_out = optree.tree_map(lambda v: torch.zeros_like(v, dtype=accumulator_dtype(v.dtype)), sub)
    loss = None
    num_data = num_outputs = 0
    per_example = PerExample()
    for i, (x, y) in enumerate(batches):
        if layers:
            batch_loss = _structured_batch(apply_fn, params, layers, x, y, lik, kind, num_mc, generator, out, i)
        else:
            f = first_forward(apply_fn, params, x, i)
            check_targets(lik, f, y, i)
            batch_loss = lik.nll(f, y).sum()
        if generic_names:
            _generic_batch(apply_fn, sub, subset, x, y, lik, kind, num_mc, generator, chunk_size, generic_out, per_example)
        loss = batch_loss if loss is None else loss + batch_loss
        num_data += y.shape[0]
        num_outputs += lik.num_outputs(y)
    out.update(generic_out)
    diag = {k: out[k].to(params[k].dtype) for k in params if k in active}
    return diag, CurvatureStats(loss.detach(), num_data, num_outputs)


def dense_curvature(
    apply_fn: Any,
    params: dict[str, Tensor],
    data: Iterable,
    likelihood: str | Likelihood,
    *,
    subset: Iterable[str] | None = None,
    kind: Kind = "ggn",
    num_mc: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int = 32,
    max_size: int = 20_000,
) -> tuple[Tensor, CurvatureStats]:
    """The full ``P x P`` curvature of a (small) subset of leaves, flattened in ``subset`` order.

    Same quantities as :func:`diag_curvature`, for the last layer or a small
    subnetwork; ``P`` above ``max_size`` is refused (``P^2`` numbers).
    """
    if kind not in ("ggn", "ef", "mc_ggn"):
        raise ValueError(f"kind must be 'ggn', 'ef' or 'mc_ggn', got {kind!r}")
    positive_int(chunk_size, "chunk_size")
    positive_int(num_mc, "num_mc")
    check_generator(generator)
    wanted = set(params) if subset is None else set(subset)
    if not wanted <= set(params):
        raise ValueError(f"subset names {sorted(wanted - set(params))} are not leaves of params")
    names = [k for k in params if k in wanted]
    if not names:
        raise ValueError("subset is empty: nothing to compute")
    size = sum(params[k].numel() for k in names)
    if size > max_size:
        raise ValueError(
            f"a dense curvature over {size} weights needs {size}^2 numbers; use structure='diag' or a "
            f"smaller subset (or raise max_size={max_size})"
        )
    check_eval_normalisation(apply_fn, "dense_curvature")
    lik = unit_likelihood(likelihood)
    sub, subset = split(params, names)

    def f_one(p, xi):
        return apply_fn(subset.merge(p), xi[None])[0]

    def nll_one(p, xi, yi):
        return lik.nll(apply_fn(subset.merge(p), xi[None]), yi[None]).sum()

    def flat(tree: dict[str, Tensor], lead: int) -> Tensor:
        return torch.cat([tree[k].reshape(*tree[k].shape[:lead], -1) for k in names], dim=-1)

    ref = next(iter(sub.values()))
    out = torch.zeros(size, size, dtype=accumulator_dtype(ref.dtype), device=ref.device)
    loss, num_data, num_outputs = None, 0, 0
    per_example = PerExample()
    for i, (x, y) in enumerate(check_data(data)):
        f_all = first_forward(apply_fn, subset.merge(sub), x, i)
        check_targets(lik, f_all, y, i)
        batch_loss = lik.nll(f_all, y).sum()
        loss = batch_loss if loss is None else loss + batch_loss
        num_data += y.shape[0]
        num_outputs += lik.num_outputs(y)
        for start in range(0, len(x), chunk_size):
            xs, ys, fs = x[start : start + chunk_size], y[start : start + chunk_size], f_all[start : start + chunk_size]
            if kind == "ggn":
                with math_attention():
                    jac = per_example(
                        torch.func.jacrev(f_one), (None, 0), sub, xs, loop_fn=torch.func.jacrev(f_one, chunk_size=1)
                    )
                    jac = flat(jac, fs.dim())
                    jac = jac.reshape(jac.shape[0], -1, size)  # (n, outputs, P)
                V = ggn_columns(lik, fs)
                rows = torch.einsum("kno,nop->nkp", V.reshape(V.shape[0], V.shape[1], -1), jac).reshape(-1, size)
            else:
                targets = [ys] if kind == "ef" else [_sample_targets(lik, fs, generator) for _ in range(num_mc)]
                scale = 1.0 if kind == "ef" else 1.0 / math.sqrt(num_mc)
                with math_attention():
                    rows = torch.cat(
                        [flat(per_example(torch.func.grad(nll_one), (None, 0, 0), sub, xs, t), 1) * scale for t in targets]
                    )
            rows = rows.to(out.dtype)
            out += rows.T @ rows
    return out.detach().to(ref.dtype), CurvatureStats(loss.detach(), num_data, num_outputs)
