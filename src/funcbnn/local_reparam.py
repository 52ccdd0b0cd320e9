"""Local reparameterisation: sample pre-activations instead of weights.

Under a mean-field Gaussian posterior the pre-activation of a linear layer,
``a = x W^T + b``, is Gaussian given its input, with

    E[a]   = x mu_W^T + mu_b,
    Var[a] = x^2 (sigma_W^2)^T + sigma_b^2

(elementwise squares). Kingma, Salimans & Welling (2015), "Variational Dropout
and the Local Reparameterization Trick", sample ``a`` from these moments
directly, with independent noise per example: the same marginal distribution
of every pre-activation as drawing ``W`` (and the same expected loss), but
the examples of a minibatch no longer share one weight draw, which lowers the
variance of the gradient estimate, and no weight-sized noise is drawn.

Here this applies to ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers whose weight
is part of the posterior; every other parameter (norm scales, embeddings, ...)
is drawn as a weight. For convolutions the per-position marginals are exact,
while the correlation between positions that share a kernel is dropped (the
usual approximation for convolutional layers). Use it for training; for
predictions draw weights (:meth:`funcbnn.families.DiagGaussian.sample` and
:func:`funcbnn.sample_outputs`), which keeps the joint distribution over inputs.

    apply_fn, params, buffers = local_reparameterize(net)
    loss = funcbnn.vi.elbo(apply_fn, post, state, prior, (x, y), num_data=N)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import positive_int
from .checks import check_generator, guarded_call
from .families.diag_gaussian import DiagGaussianState
from .model import Functional, FunctionalModel, TrainMode, functionalize
from .tree import Tree, check_same_structure

__all__ = ["LOCAL_LAYERS", "LocalReparamModel", "local_reparameterize", "preactivation_moments"]

LOCAL_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layer types whose pre-activations are sampled (subclasses included)."""
_BASE_FORWARD = {cls: cls.forward for cls in LOCAL_LAYERS}


def _affine(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)  # handles padding modes, stride, dilation, groups


def preactivation_moments(
    layer: nn.Module,
    x: Tensor,
    weight_mean: Tensor,
    weight_std: Tensor,
    bias_mean: Tensor | None = None,
    bias_std: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``layer``'s pre-activations when its weights are independent Gaussians.

    ``mean = layer(x; weight_mean, bias_mean)`` and
    ``var = layer(x**2; weight_std**2, bias_std**2)`` (Kingma et al. 2015).

    Parameters
    ----------
    layer : nn.Linear or nn.Conv1d/2d/3d
        Supplies the operation (and a convolution's stride, padding, dilation, groups).
    x : Tensor
        The layer's input.
    weight_mean, weight_std : Tensor
        Moments of the weight, shaped like ``layer.weight``.
    bias_mean, bias_std : Tensor, optional
        Moments of the bias; a bias without ``bias_std`` is deterministic.

    Returns
    -------
    (Tensor, Tensor)
        The pre-activation mean and variance, shaped like ``layer(x)``.
    """
    if not isinstance(layer, LOCAL_LAYERS):
        raise TypeError(f"layer must be one of {[t.__name__ for t in LOCAL_LAYERS]}, got {type(layer).__name__}")
    mean = _affine(layer, x, weight_mean, bias_mean)
    var_bias = None if bias_std is None else bias_std * bias_std
    var = _affine(layer, x * x, weight_std * weight_std, var_bias)
    return mean, var


class _Layer(NamedTuple):
    weight: str  # parameter name of the weight (in the posterior)
    bias: str | None  # parameter name of the bias, if it is in the posterior
    frozen_bias: str | None  # name of a deterministic (requires_grad=False) bias


class _Context(NamedTuple):
    mean: dict[str, Tensor]
    std: dict[str, Tensor]
    frozen: dict[str, Tensor]
    generator: torch.Generator | None


class _LocalForward:
    """A layer's forward while patched: plain outside a sampling context, sampled pre-activations inside.

    A class rather than a closure so that models holding patched layers pickle.
    """

    def __init__(self, owner: "LocalReparamModel", layer: nn.Module, names: _Layer, plain_forward: Any) -> None:
        self.owner, self.layer, self.names, self.plain_forward = owner, layer, names, plain_forward

    def __call__(self, x: Tensor) -> Tensor:
        ctx = self.owner._ctx
        if ctx is None:
            return self.plain_forward(x)
        names = self.names
        if names.bias is not None:
            b_mean, b_std = ctx.mean[names.bias], ctx.std[names.bias]
        else:
            b_mean, b_std = (ctx.frozen[names.frozen_bias] if names.frozen_bias else None), None
        mean, var = preactivation_moments(self.layer, x, ctx.mean[names.weight], ctx.std[names.weight], b_mean, b_std)
        noise = torch.empty_like(mean).normal_(generator=ctx.generator)
        # The clamp keeps the gradient finite where a variance is exactly 0 (zero input, no bias noise).
        return mean + torch.sqrt(var.clamp_min(torch.finfo(var.dtype).tiny)) * noise


class LocalReparamModel:
    """A :class:`~funcbnn.model.FunctionalModel` whose Linear/Conv layers can sample pre-activations.

    ``model(params, x)`` is the plain deterministic forward at one weight tree,
    exactly as the wrapped ``FunctionalModel``; :meth:`sample_outputs_local`
    runs the locally reparameterised forward for a diagonal-Gaussian state.
    Build it with :func:`local_reparameterize`. Other attributes
    (``params_template``, ``frozen``, ``buffers``, ``check_params``, ...) are
    those of the wrapped model.
    """

    def __init__(self, functional: FunctionalModel, layers: dict[nn.Module, _Layer]) -> None:
        self.functional = functional
        self.layers = layers
        self._local_names = {n for layer in layers.values() for n in (layer.weight, layer.bias) if n}
        self._ctx: _Context | None = None
        # The functional model's own (re-entrant) lock: while the context is set, no other thread
        # can run a plain forward of the shared shell and pick up the sampling layers.
        self._lock = functional._lock
        for layer, names in layers.items():
            layer.forward = self._make_forward(layer, names, layer.forward)

    def __getstate__(self) -> dict[str, Any]:
        # The patched forwards close over this object; a copy re-patches its own layers.
        return {"functional": self.functional, "layers": self.layers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for layer in state["layers"]:
            layer.__dict__.pop("forward", None)
        self.__init__(state["functional"], state["layers"])

    @property
    def local_layers(self) -> list[str]:
        """Names of the layers whose pre-activations are sampled."""
        named = {id(m): n for n, m in self.functional.module.named_modules()}
        return [named[id(m)] for m in self.layers]

    def _make_forward(self, layer: nn.Module, names: _Layer, plain_forward: Any) -> Any:
        return _LocalForward(self, layer, names, plain_forward)

    def __call__(self, params: dict[str, Tensor], x: Any, buffers: dict[str, Tensor] | None = None) -> Any:
        return self.functional(params, x, buffers)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("functional", "layers"):
            raise AttributeError(name)
        return getattr(self.functional, name)

    def sample_outputs_local(
        self,
        state: DiagGaussianState,
        x: Any,
        num_samples: int = 1,
        *,
        generator: torch.Generator | None = None,
        buffers: dict[str, Tensor] | None = None,
        mean: Tree | None = None,
        std: Tree | None = None,
    ) -> Tensor:
        """Outputs ``(S, N, ...)`` with the local layers' pre-activations sampled, differentiable in ``state``.

        Parameters
        ----------
        state : DiagGaussianState or any diagonal state
            Mean-field Gaussian over the model's parameters. Its moments are
            read from ``state.mean`` and ``softplus(state.rho)`` unless given
            as ``mean`` and ``std``, which is how :func:`funcbnn.vi.elbo` passes
            them for any family declaring ``mean`` and ``variance``.
        x : Tensor or tree
            Input batch.
        num_samples : int
            Independent forward draws ``S``. When every parameter belongs to a
            local layer and ``x`` is a tensor, the ``S`` draws run as one forward
            on the batch repeated ``S`` times (each copy gets its own noise);
            otherwise as a loop.
        generator : torch.Generator, optional
            Source of all the noise (parameters outside local layers first, then
            the layers' noise in forward order).
        buffers : dict, optional
            Model buffers.
        mean, std : tree, optional
            The posterior means and standard deviations of the parameters,
            when the caller has them from the family (each defaults to the
            one read from a ``DiagGaussianState``).
        """
        if mean is None or std is None:
            if not isinstance(state, DiagGaussianState):
                raise TypeError(
                    "local reparameterisation needs a diagonal-Gaussian state (DiagGaussianState), "
                    f"got {type(state).__name__}; for another diagonal family pass its mean= and std="
                )
            if mean is None:
                mean = state.mean
            if std is None:
                check_same_structure(state.mean, state.rho, "state.rho")
                std = {k: F.softplus(v) for k, v in state.rho.items()}
        num = positive_int(num_samples, "num_samples")
        check_generator(generator)
        self.functional.check_params(mean, "state.mean")
        if optree.tree_structure(mean) != optree.tree_structure(std):
            check_same_structure(mean, std, "std")  # raises the detailed error
        ctx = _Context(mean, std, self.functional.frozen, generator)
        others = [k for k in mean if k not in self._local_names]
        with self._lock:
            self._ctx = ctx
            try:
                # a torch error from the forward becomes a ValueError naming the inputs (shape, dtype)
                with guarded_call(x, mean, "the inputs", "local reparameterisation"):
                    if not others and isinstance(x, Tensor) and x.dim() > 0:
                        n = x.shape[0]
                        repeated = x.expand(num, *x.shape).reshape(num * n, *x.shape[1:]) if num > 1 else x
                        out = self.functional(mean, repeated, buffers)
                        return optree.tree_map(lambda o: o.reshape(num, n, *o.shape[1:]), out)
                    outs = []
                    for _ in range(num):
                        params = dict(mean)
                        for k in others:
                            m = mean[k]
                            params[k] = m + std[k] * torch.empty_like(m).normal_(generator=generator)
                        outs.append(self.functional(params, x, buffers))
                    return optree.tree_map(lambda *o: torch.stack(o), *outs)
            finally:
                self._ctx = None

    def __repr__(self) -> str:
        return f"LocalReparamModel({type(self.functional.module).__name__}, local layers {self.local_layers})"


def local_reparameterize(module: nn.Module, *, train: TrainMode = False) -> Functional:
    """Like :func:`funcbnn.functionalize`, with local reparameterisation for Linear and Conv layers.

    Parameters
    ----------
    module : nn.Module
        Any module; it is not modified.
    train : bool or callable
        As in :func:`funcbnn.functionalize`.

    Returns
    -------
    Functional
        ``(apply_fn, params, buffers)`` where ``apply_fn`` is a
        :class:`LocalReparamModel`: ``apply_fn(params, x)`` is the ordinary
        forward, and :func:`funcbnn.vi.elbo` given this ``apply_fn`` samples the
        pre-activations of every ``nn.Linear`` / ``nn.Conv{1,2,3}d`` whose weight
        is trainable (Kingma et al. 2015).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> apply_fn, params, _ = local_reparameterize(net)
    >>> apply_fn.local_layers
    ['0', '2']
    """
    functional, params, buffers = functionalize(module, train=train)
    canonical: dict[int, str] = {}
    for name, p in module.named_parameters():
        canonical.setdefault(id(p), name)
    shell = dict(functional.module.named_modules())
    uses: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    # Layers whose weights other code reads directly (MultiheadAttention's out_proj) would see the
    # mean instead of a draw: they are sampled as weights instead.
    read_elsewhere = {
        id(child) for parent in module.modules() if isinstance(parent, nn.MultiheadAttention)
        for child in parent.modules() if child is not parent
    }
    layers: dict[nn.Module, _Layer] = {}
    for name, sub in module.named_modules():
        if not isinstance(sub, LOCAL_LAYERS) or "forward" in vars(sub) or id(sub) in read_elsewhere:
            continue  # a module with its own forward override is left as it is
        if type(sub).forward is not _BASE_FORWARD[next(c for c in LOCAL_LAYERS if isinstance(sub, c))]:
            continue  # a subclass with its own forward: its extra computation must run
        if any(uses.get(id(t), 0) > 1 for t in (sub.weight, sub.bias) if t is not None):
            continue  # a tied weight is used by another module too: sample it as a weight
        weight = canonical.get(id(sub.weight)) if isinstance(sub.weight, nn.Parameter) else None
        if weight is None or weight not in params:
            continue  # a frozen weight: the layer stays deterministic
        bias_name = canonical.get(id(sub.bias)) if isinstance(sub.bias, nn.Parameter) else None
        bias = bias_name if bias_name in params else None
        frozen_bias = bias_name if bias_name is not None and bias_name in functional.frozen else None
        if sub.bias is not None and bias is None and frozen_bias is None:
            continue  # a bias that is not a parameter (e.g. a buffer): leave the layer alone
        layers[shell[name]] = _Layer(weight, bias, frozen_bias)
    return Functional(LocalReparamModel(functional, layers), params, buffers)  # type: ignore[arg-type]
