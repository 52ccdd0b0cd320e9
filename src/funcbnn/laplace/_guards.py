"""Early checks on what a Laplace fit or prediction is given: the model, its outputs, the data, the state.

Each turns a mistake that would otherwise surface deep inside torch (a
BatchNorm complaining about one value per channel, ``'tuple' object has no
attribute 'dim'``, ``linalg.eigh`` failing to converge on NaN curvature) into
an error that names the argument and says what to do.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import optree
import torch
from torch import Tensor, nn

from ..checks import check_finite, guarded_call, model_input_error

__all__ = [
    "check_eval_normalisation", "tensor_output", "check_curvature", "check_state_fits", "LOW_PRECISION",
    "accumulator_dtype", "refuse_low_precision", "model_call", "check_batched_inputs",
]

# Dtypes torch's linear algebra (eigh, cholesky) does not take on the CPU, and whose sums over a
# data set lose every increment past ~2^11 (float16) or ~2^8 (bfloat16) equal terms: curvature of
# such models is summed in float32, decomposed in float32, and cast back to the model's dtype.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype curvature of a ``dtype`` model is summed in: float32 for float16/bfloat16, else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def refuse_low_precision(params: dict[str, Tensor], structure: str) -> None:
    """``TypeError`` for ``structure="full"`` on a float16/bfloat16 model.

    The dense posterior's Cholesky factor and its triangular solves (sampling,
    the predictive) have no float16/bfloat16 kernels in torch; ``"diag"`` and
    ``"kron"`` decompose in float32 and work.
    """
    low = sorted({str(v.dtype) for v in params.values() if v.dtype in LOW_PRECISION})
    if structure == "full" and low:
        raise TypeError(
            f"structure='full' does not support {', '.join(low)} parameters (torch has no {low[0]} Cholesky or "
            "triangular solve for the dense posterior); use structure='diag' or 'kron', which decompose in float32, "
            "or fit a float32 copy of the model (model.float())"
        )


@contextlib.contextmanager
def model_call(x: Any, params: Any, name: str) -> Iterator[None]:
    """:func:`funcbnn.checks.guarded_call`, and a ``TypeError`` from inside the call (``x`` a list where the
    model takes a tensor) named the same way: a ``ValueError`` about ``name``, torch's error chained."""
    try:
        with guarded_call(x, params, name):
            yield
    except TypeError as e:
        if type(e).__module__.startswith("funcbnn") or "could not run on" in str(e):
            raise
        raise model_input_error(e, x, params, name) from e


def check_batched_inputs(x: Any, name: str, n: int | None = None) -> None:
    """``ValueError`` unless every tensor in the ``funcbnn.Inputs`` ``x`` has the leading batch axis of size ``n``.

    Laplace slices an ``Inputs`` per example and per chunk along every tensor's
    leading axis, as :class:`funcbnn.Inputs` documents. A tensor shared by the
    whole batch (a ``(4,)`` scale vector, a 0-d temperature) would be sliced
    too: a torch ``IndexError`` deep inside, or, when its length happens to equal
    the batch size, silently wrong curvature. Such a tensor cannot be told from
    a batched one when the sizes agree (the caller's contract); every other
    case is refused here. ``n`` is the batch size (the targets' length); when
    ``None``, the first batched tensor's leading size. A plain tensor ``x`` is
    not checked here.
    """
    from ..model import Inputs  # funcbnn.model imports nothing from laplace; imported late to keep _guards light

    if not isinstance(x, Inputs):
        return
    leaves = optree.tree_flatten_with_path((x.args, x.kwargs))
    for path, t in zip(leaves[0], leaves[1]):
        if not isinstance(t, Tensor):
            continue  # flags, scales: passed through unchanged
        where = (f"positional input {path[1]}" if path[0] == 0 else f"keyword input {path[1]!r}") + "".join(
            f"[{p!r}]" for p in path[2:]
        )
        if n is None and t.dim():
            n = t.shape[0]
        if t.dim() == 0 or t.shape[0] != n:
            got = "a 0-d tensor" if t.dim() == 0 else f"a tensor of shape {tuple(t.shape)}"
            size = "" if n is None else f" of size {n}"
            raise ValueError(
                f"{name}: {where} of the funcbnn.Inputs is {got}, but every tensor in an Inputs must have the "
                f"leading batch axis{size} (each is sliced per example); a tensor shared by the whole batch "
                "goes into the model instead: close over it (or register it as a module buffer), or pass a "
                "Python number for a scalar"
            )


def check_eval_normalisation(apply_fn: Any, where: str = "laplace.fit") -> None:
    """Refuse a model whose BatchNorm layers normalise with batch statistics, or whose dropout is on.

    The curvature is a sum of per-example terms, and a layer that normalises
    with the batch's own mean and variance makes every output depend on the
    whole batch (on one example at a time the variance is undefined). Dropout
    in train mode makes the network, so its curvature and the linearised
    predictive, random from call to call.
    """
    module = getattr(apply_fn, "module", None)
    if not isinstance(module, nn.Module):
        return
    dropout = [
        name or type(m).__name__
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
    ]
    if dropout:
        raise ValueError(
            f"{where} needs a deterministic network, but the dropout layer(s) {dropout} are in train mode: the "
            "curvature and the predictive would change from call to call. Functionalize the model in eval mode "
            "(functionalize(model), the default, not train=True)"
        )
    names = [
        name or type(m).__name__
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
    ]
    if names:
        raise ValueError(
            f"{where} needs eval-mode normalisation, but the BatchNorm layer(s) {names} use batch statistics "
            "(train mode, or track_running_stats=False): the per-example curvature is undefined when each output "
            "depends on the whole batch. Functionalize the model in eval mode (functionalize(model), "
            "the default, not train=True) after training, so the running statistics are used"
        )


def tensor_output(f: Any, where: str = "laplace.fit") -> Tensor:
    """``f`` if it is a tensor; else a ``TypeError`` saying how to wrap a model with several outputs."""
    if isinstance(f, Tensor):
        return f
    kind = type(f).__name__
    keys = f" with keys {list(f)[:6]}" if isinstance(f, dict) else (f" of {len(f)} items" if isinstance(f, (tuple, list)) else "")
    raise TypeError(
        f"{where} needs a model whose output is one tensor (N, ...), got a {kind}{keys}. Wrap the model so it returns "
        "the tensor the likelihood sees, e.g. class Head(nn.Module): def forward(self, x): return model(x)[0] "
        "(or ['logits'])"
    )


def check_curvature(curv: Any, where: str = "laplace.fit") -> None:
    """``NonFiniteError`` if the accumulated curvature holds NaN or inf (before any eigendecomposition sees it)."""
    check_finite(
        curv,
        "the accumulated curvature",
        context=(
            f"{where} had finite inputs, targets and parameters, so the model's outputs or their gradients "
            "overflowed; check the outputs' scale, or fit in float64"
        ),
    )


def check_state_fits(state: Any, names: tuple[str, ...], shapes: dict[str, torch.Size], structure: str) -> None:
    """``ValueError`` if a ``LaplaceState`` was fitted on another model or structure than these functions."""
    mean = getattr(state, "mean", None)
    if not isinstance(mean, dict):
        raise TypeError(f"state must be a LaplaceState (from funcbnn.laplace.fit), got {type(state).__name__}")
    if tuple(mean) != names:
        raise ValueError(
            f"state does not belong to this Laplace: its posterior covers leaves {list(mean)[:6]}, "
            f"this one {list(names)[:6]}; rebuild it with funcbnn.laplace.from_state(apply_fn, params, state)"
        )
    for k, v in mean.items():
        if v.shape != shapes[k]:
            raise ValueError(
                f"state does not belong to this Laplace: leaf {k!r} has shape {tuple(v.shape)}, "
                f"the fitted model's {tuple(shapes[k])}"
            )
    if state.structure != structure:
        raise ValueError(f"state has structure {state.structure!r}, this Laplace was built for {structure!r}")
