"""Reproducible MC dropout (Gal & Ghahramani 2016): the model's own dropout layers, masks from a seed.

"Dropout as a Bayesian Approximation": keep dropout on at test time and
average the predictions of many masks. Libraries draw the masks from the
global RNG, so predictions change with the chunk size, with the vmap-or-loop
path and with anything else that draws random numbers. Here every weight draw
carries an integer *seed*, and each dropout layer derives its mask from
``(seed, layer, call, element index)`` with a counter-based integer hash (pure
tensor arithmetic, so it runs the same inside ``vmap``, in a loop, on CPU and
CUDA). The same seeds give the same masks whatever the chunk size or path;
an element's mask depends only on the seed, the layer, the call and the
element's flat position in that layer's input.

Usage::

    apply_fn, params, buffers = mc_dropout.functionalize(net)   # BatchNorm in eval mode
    post = funcbnn.families.dropout()
    state = post.init(params)
    draws = post.sample(state, 64, generator=g)                 # {"params": ..., "seed": (64,)}
    outputs = funcbnn.sample_outputs(apply_fn, draws, x)         # (64, N, ...)

``apply_fn(draw, x)`` takes one draw ``{"params": tree, "seed": int64}``;
``apply_fn(params, x)`` with a plain parameter tree runs with dropout off.
Only dropout *modules* are intercepted (``nn.Dropout``, ``nn.Dropout1d/2d/3d``,
the latter dropping whole channels); a forward that calls
``torch.nn.functional.dropout`` directly is not affected.
"""

from __future__ import annotations

import threading
from typing import Any

import optree
import torch
from torch import Tensor, nn

from .checks import check_generator
from .model import Functional, FunctionalModel, TrainMode, functionalize as _functionalize

__all__ = ["functionalize", "DropoutModel", "hash_uniform", "draw_seeds", "DROPOUT_LAYERS"]

DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
"""The dropout modules whose masks are replaced by seeded masks."""

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2^32`` for ``0 <= x < 2^32`` in int64, without signed overflow (16-bit halves of ``c``)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (the "lowbias32" of Wellons 2018): every input bit affects every output bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_uniform(seed: Tensor, stream: int, shape: torch.Size, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform numbers in [0, 1) of ``shape``, a pure function of ``(seed, stream, element index)``.

    ``seed`` is an int64 tensor (0-d, or batched under ``vmap``); ``stream``
    separates dropout layers and calls. 24 bits of each hash make an exact
    float32 grid ``k / 2^24``.

    Examples
    --------
    >>> u = hash_uniform(torch.tensor(3), 0, torch.Size([4]))
    >>> bool(((u >= 0) & (u < 1)).all()), torch.equal(u, hash_uniform(torch.tensor(3), 0, torch.Size([4])))
    (True, True)
    """
    key = _hash32((seed & _MASK32) ^ ((stream + 1) * 0x9E3779B9 & _MASK32))
    index = torch.arange(shape.numel(), dtype=torch.int64, device=seed.device).reshape(shape) & _MASK32
    bits = _hash32(_hash32(index ^ key) + 0x632BE5AB & _MASK32)
    return (bits >> 8).to(dtype) * (1.0 / (1 << 24))


def draw_seeds(num_samples: int | None, generator: torch.Generator | None, device: torch.device | str = "cpu") -> Tensor:
    """Mask seeds: ``(num_samples,)`` int64 (0-d for ``None``) from ``generator``, placed on ``device``.

    Examples
    --------
    >>> draw_seeds(3, torch.Generator().manual_seed(0)).shape
    torch.Size([3])
    >>> draw_seeds(3, 0)
    Traceback (most recent call last):
        ...
    TypeError: generator must be a torch.Generator or None, got int 0 (use torch.Generator().manual_seed(0))
    """
    check_generator(generator)
    where = generator.device if generator is not None else torch.device("cpu")  # draw where the generator lives
    shape = () if num_samples is None else (num_samples,)
    return torch.randint(0, 2**31 - 1, shape, generator=generator, dtype=torch.int64, device=where).to(device)


class _Seeds(threading.local):
    def __init__(self) -> None:
        self.seed: Tensor | None = None
        self.calls: dict[int, int] = {}  # per dropout layer: how often it ran in this forward

    def __reduce__(self):  # thread-local storage does not pickle; a fresh one is equivalent between calls
        return (_Seeds, ())


# Spatial dims of each channel-dropout layer; an input with exactly one more dim is unbatched (C, ...),
# as torch reads it. (Dropout2d reads a 3-D input as batched (N, C, L), torch's historical behaviour.)
_SPATIAL = {nn.Dropout1d: 1, nn.Dropout3d: 3}


class _SeededMask:
    """Forward hook of one dropout layer: replaces its (identity, eval-mode) output by a seeded mask.

    A class rather than a closure so that the model pickles.
    """

    def __init__(self, seeds: "_Seeds", index: int, layer: nn.Module) -> None:
        self.seeds, self.index, self.p = seeds, index, float(layer.p)
        self.channelwise = not isinstance(layer, nn.Dropout)
        self.spatial = _SPATIAL.get(type(layer))

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        seed, p = self.seeds.seed, self.p
        if seed is None or p == 0.0:
            return None
        calls = self.seeds.calls
        call = calls[self.index] = calls.get(self.index, -1) + 1  # a layer reused in one forward gets fresh masks
        x = inputs[0]
        if p >= 1.0:
            return torch.zeros_like(x)
        if not self.channelwise:
            shape = x.shape
        elif self.spatial is not None and x.dim() == self.spatial + 1:  # unbatched (C, *spatial)
            shape = x.shape[:1] + (1,) * (x.dim() - 1)
        else:  # one number per (example, channel), broadcast over the spatial axes
            shape = x.shape[:2] + (1,) * (x.dim() - 2)
        # float32 uniforms whatever x's dtype: float16 cannot hold the 24-bit grid (it would overflow to inf)
        keep = hash_uniform(seed, (self.index << 16) + call, torch.Size(shape)) >= p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


class DropoutModel:
    """``apply_fn(draw, x)``: a :class:`~funcbnn.model.FunctionalModel` whose dropout layers use seeded masks.

    ``draw`` is ``{"params": tree, "seed": int64 tensor}``; a plain parameter
    tree runs the network with dropout off (the MAP / eval forward).
    """

    def __init__(self, base: FunctionalModel) -> None:
        self.base = base
        self._seeds = _Seeds()
        self.rates = {}
        for index, (name, m) in enumerate(n_m for n_m in base.module.named_modules() if isinstance(n_m[1], DROPOUT_LAYERS)):
            m.training = False  # the hook applies the mask; the layer itself is the identity
            m.register_forward_hook(_SeededMask(self._seeds, index, m))
            self.rates[name] = float(m.p)

    @property
    def module(self) -> nn.Module:
        return self.base.module

    def with_seeds(self, params: Any, num_samples: int | None, generator: torch.Generator | None) -> dict[str, Any]:
        """``{"params": params, "seed": seeds}``: weight draws (a leading axis of ``num_samples``, or none
        for ``None``) paired with mask seeds drawn from ``generator``.

        :mod:`funcbnn.vi` calls this on any ``apply_fn`` that has it, so a dropout
        model trained by variational inference draws its masks from the same
        generator as its weights: the loss history is reproducible.
        """
        check_generator(generator)
        ref = optree.tree_leaves(params)[0]
        return {"params": params, "seed": draw_seeds(num_samples, generator, ref.device)}

    def __call__(self, draw: Any, x: Any, buffers: dict[str, Tensor] | None = None) -> Any:
        if isinstance(draw, dict) and set(draw) == {"params", "seed"}:
            params, seed = draw["params"], draw["seed"]
            if not isinstance(seed, Tensor) or seed.dtype != torch.int64 or seed.dim() != 0:
                raise ValueError(f"draw['seed'] must be a 0-d int64 tensor, got {getattr(seed, 'dtype', type(seed))}")
        else:
            params, seed = draw, None
        previous = (self._seeds.seed, self._seeds.calls)
        self._seeds.seed, self._seeds.calls = seed, {}
        try:
            return self.base(params, x, buffers)
        finally:
            self._seeds.seed, self._seeds.calls = previous

    def __repr__(self) -> str:
        return f"DropoutModel({type(self.base.module).__name__}, rates={self.rates})"


def functionalize(module: nn.Module, *, train: TrainMode = False) -> Functional:
    """Like :func:`funcbnn.functionalize`, with the dropout layers drawing seeded masks.

    Returns ``(apply_fn, params, buffers)`` with ``apply_fn`` a :class:`DropoutModel`.
    Other layers follow ``train`` (default eval: BatchNorm uses its running
    statistics). Raises ``ValueError`` if ``module`` has no dropout layer.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    >>> apply_fn, params, _ = functionalize(net)
    >>> draw = {"params": params, "seed": torch.tensor(7)}
    >>> torch.equal(apply_fn(draw, torch.ones(4, 3)), apply_fn(draw, torch.ones(4, 3)))
    True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    unsupported = sorted({type(m).__name__ for m in module.modules() if isinstance(m, (nn.AlphaDropout, nn.FeatureAlphaDropout))})
    if unsupported:
        raise ValueError(
            f"module has {unsupported} layers, which seeded MC dropout does not cover (their masks also shift and "
            f"scale the activations); supported: {', '.join(c.__name__ for c in DROPOUT_LAYERS)}"
        )
    if not any(isinstance(m, DROPOUT_LAYERS) for m in module.modules()):
        raise ValueError(f"module {type(module).__name__} has no dropout layer ({', '.join(c.__name__ for c in DROPOUT_LAYERS)})")
    base, params, buffers = _functionalize(module, train=train)
    return Functional(DropoutModel(base), params, buffers)
