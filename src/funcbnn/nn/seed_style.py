"""deepuq-style conveniences over :class:`~funcbnn.nn.BayesianModule`, with the ELBO scaled correctly.

These are native: the ELBO of :func:`vi_elbo_step` divides the KL by the data-set
size, and arguments whose meaning differs from deepuq's are keyword-only. The
drop-in versions with deepuq's own signatures and numbers are in
:mod:`funcbnn.compat.deepuq`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .. import vi as _vi
from .._validation import positive_float, positive_int
from ..likelihoods import Likelihood
from ..predict import PredictiveSummary, sample_outputs, summarize
from .module import BayesianModule, Spec

__all__ = ["BayesianLinear", "BayesByBackpropMLP", "predict_vi_uq", "vi_elbo_step"]

class BayesianLinear(BayesianModule):
    """A Bayes-by-Backprop linear layer: ``BayesianModule(nn.Linear(in_features, out_features))``.

    Only the sizes are positional: deepuq's third positional argument is
    ``prior_sigma`` and ``nn.Linear``'s is ``bias``, so ``BayesianLinear(4, 3, 0.5)``
    is ambiguous and raises ``TypeError`` (deepuq's layer, positional as in
    deepuq, is :class:`funcbnn.compat.deepuq.BayesianLinear`).

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
        Keyword-only.
    prior_sigma : float, default 0.1
        Std of the zero-mean Gaussian prior on every weight (deepuq's default).
    posterior : str or (str, dict), default "gaussian"
    local_reparam : bool, default False
        Sample pre-activations (Kingma et al. 2015).
    dtype, device : optional
    generator : torch.Generator, optional
        Randomness of the initialisation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *args: Any,
        bias: bool = True,
        prior_sigma: float = 0.1,
        posterior: Spec = "gaussian",
        local_reparam: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if args:
            raise TypeError(
                f"BayesianLinear takes in_features and out_features positionally and everything else by keyword "
                f"(bias=..., prior_sigma=...), got the extra positional argument(s) {args!r}; "
                "deepuq's BayesianLinear(in_features, out_features, prior_sigma) is funcbnn.compat.deepuq.BayesianLinear"
            )
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        in_features = positive_int(in_features, "in_features")
        out_features = positive_int(out_features, "out_features")
        layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
        super().__init__(
            layer,
            posterior,
            ("gaussian", {"std": positive_float(prior_sigma, "prior_sigma")}),
            local_reparam=local_reparam,
            generator=generator,
        )
        self.in_features, self.out_features = in_features, out_features


class BayesByBackpropMLP(BayesianModule):
    """A Bayes-by-Backprop MLP ``input_dim -> hidden_dims... -> output_dim`` (Blundell et al. 2015).

    One :class:`BayesianModule` over an ``nn.Sequential`` of Linear layers and
    activations, so all layers are drawn and evaluated together.

    Parameters
    ----------
    input_dim : int
    hidden_dims : sequence of int
    output_dim : int
    prior_sigma : float, default 0.1
        Std of the zero-mean Gaussian prior (deepuq's default).
    activation : callable, default nn.ReLU
        Builds the activation module between layers.
    posterior : str or (str, dict), default "gaussian"
    local_reparam : bool, default False
    generator : torch.Generator, optional
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        output_dim: int,
        prior_sigma: float = 0.1,
        *,
        activation: Callable[[], nn.Module] = nn.ReLU,
        posterior: Spec = "gaussian",
        local_reparam: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        dims = [positive_int(input_dim, "input_dim")]
        dims += [positive_int(h, f"hidden_dims[{i}]") for i, h in enumerate(hidden_dims)]
        dims.append(positive_int(output_dim, "output_dim"))
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(activation())
        super().__init__(
            nn.Sequential(*layers),
            posterior,
            ("gaussian", {"std": positive_float(prior_sigma, "prior_sigma")}),
            local_reparam=local_reparam,
            generator=generator,
        )
        self.dims = tuple(dims)


def _check_model(model: Any) -> BayesianModule:
    if not isinstance(model, BayesianModule):
        raise TypeError(f"model must be a funcbnn BayesianModule, got {type(model).__name__}")
    return model


def predict_vi_uq(
    model: BayesianModule,
    x: Any,
    n_samples: int = 50,
    apply_softmax: bool = False,
    aleatoric_var: Tensor | float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> PredictiveSummary:
    """Monte-Carlo predictive summary of a Bayes-by-Backprop model (deepuq's ``predict_vi_uq``).

    Draws ``n_samples`` weight trees and evaluates them in one batched call
    (:func:`funcbnn.sample_outputs`), then summarises with :func:`funcbnn.summarize`.

    Parameters
    ----------
    model : BayesianModule
    x : Tensor
        Inputs.
    n_samples : int, default 50
    apply_softmax : bool, default False
        Outputs are class logits: summarise mean probabilities, their variance,
        entropy and mutual information (``likelihood="classification"``).
        Otherwise they are regression means.
    aleatoric_var : Tensor or float, optional
        Regression only: observation-noise variance added to the epistemic
        variance (``total_var = epistemic_var + aleatoric_var``).
    generator : torch.Generator, optional

    Returns
    -------
    PredictiveSummary
    """
    model = _check_model(model)
    n_samples = positive_int(n_samples, "n_samples")
    if apply_softmax and aleatoric_var is not None:
        raise ValueError("aleatoric_var applies to regression; with apply_softmax=True it comes from the probabilities")
    with torch.no_grad():
        samples = model.sample_parameters(n_samples, generator=generator)
        outputs = sample_outputs(model.apply_fn, samples, x)
    if apply_softmax:
        return summarize(outputs, "classification")
    summary = summarize(outputs, "regression")
    if aleatoric_var is None:
        return summary
    av = torch.as_tensor(aleatoric_var, dtype=summary.mean.dtype, device=summary.mean.device)
    if bool((av < 0).any()) or not bool(torch.isfinite(av).all()):
        raise ValueError("aleatoric_var must be finite and non-negative")
    try:
        av = torch.broadcast_to(av, summary.mean.shape)
    except RuntimeError:
        raise ValueError(
            f"aleatoric_var of shape {tuple(av.shape)} does not broadcast to the outputs {tuple(summary.mean.shape)}"
        ) from None
    return summary._replace(aleatoric_var=av, total_var=summary.epistemic_var + av)


def vi_elbo_step(
    model: BayesianModule,
    x: Any,
    y: Tensor,
    num_batches: int,
    criterion: Callable[[Tensor, Tensor], Tensor] | str | Likelihood | None = None,
    kl_weight: float = 1.0,
    mc_samples: int = 1,
    *,
    num_data: int | None = None,
    generator: torch.Generator | None = None,
) -> _vi.ELBOInfo:
    """deepuq's ``vi_elbo_step`` with the ELBO scaled correctly: ``(loss, nll, kl)`` of one minibatch.

    ``loss = nll + kl_weight * KL / num_data`` with ``num_data = num_batches *
    len(y)`` (pass ``num_data`` when the last batch is smaller): summed over an
    epoch this is the negative ELBO / N (Blundell et al. 2015). deepuq returns
    ``nll + kl_weight * KL / num_batches``, whose KL term is ``len(y)`` times
    too strong relative to the batch-mean NLL (a prior that weighs like the
    data set multiplied by the batch size), and its ``kl`` output is that
    scaled ``KL / num_batches``; here ``kl`` is the whole ``KL(q || p)``.

    Parameters
    ----------
    model : BayesianModule
    x, y : minibatch
    num_batches : int
        Minibatches per epoch (``len(train_loader)``).
    criterion : callable or likelihood, optional
        A batch-mean loss ``criterion(outputs, targets)`` such as
        ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()``, or a funcbnn likelihood
        (name or object). Default: the categorical likelihood (cross-entropy).
    kl_weight : float, default 1.0
    mc_samples : int, default 1
        Weight draws averaged in the NLL (one batched forward).
    num_data : int, optional
        The data-set size, overriding ``num_batches * len(y)``.
    generator : torch.Generator, optional

    Returns
    -------
    ELBOInfo
        ``loss`` keeps its graph for ``backward()``; ``nll`` and ``kl`` are detached.
    """
    model = _check_model(model)
    num_batches = positive_int(num_batches, "num_batches")
    if not isinstance(y, Tensor) or y.dim() == 0:
        raise TypeError("y must be a Tensor with a leading batch axis")
    n = positive_int(num_batches * y.shape[0], "num_batches * len(y)") if num_data is None else num_data
    mc_samples = positive_int(mc_samples, "mc_samples")
    if criterion is None or isinstance(criterion, (str, Likelihood)):
        info = model.elbo(
            x,
            y,
            n,
            likelihood="categorical" if criterion is None else criterion,
            num_samples=mc_samples,
            kl_weight=kl_weight,
            generator=generator,
        )
    else:
        if not callable(criterion):
            raise TypeError(f"criterion must be callable or a likelihood, got {type(criterion).__name__}")
        n = _vi._check_num_data(n, y.shape[0])
        weight = _vi._check_kl_weight(kl_weight)
        outputs = model.sample_outputs(x, mc_samples, generator=generator)
        flat = outputs.reshape(mc_samples * outputs.shape[1], *outputs.shape[2:])
        targets = y.expand(mc_samples, *y.shape).reshape(mc_samples * y.shape[0], *y.shape[1:])
        nll = criterion(flat, targets)
        if not isinstance(nll, Tensor) or nll.dim() != 0:
            raise ValueError("criterion must return a scalar (a batch-mean loss such as nn.CrossEntropyLoss())")
        kl = model.kl_divergence(approx_num_samples=mc_samples, generator=generator)
        info = _vi.ELBOInfo(nll + (weight / n) * kl, nll, kl)
    return _vi.ELBOInfo(info.loss, info.nll.detach(), info.kl.detach())
