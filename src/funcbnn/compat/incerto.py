"""incerto's Bayesian methods (``incerto.bayesian``) on funcbnn's functional core.

``from incerto.bayesian import MCDropout`` becomes ``from funcbnn.compat.incerto
import MCDropout`` (``NotFittedError`` is here too, for ``incerto.exceptions``).
Every class keeps incerto's constructor, attributes, ``predict(x,
return_samples=False, normalize_output=True) -> (mean, variance[, samples])``
with the unbiased variance over samples, and its numbers; the work is native:

===========================  ==========================================================
class                        done by
===========================  ==========================================================
:class:`MCDropout`           :mod:`funcbnn.mc_dropout` seeded masks, one batched call
:class:`DeepEnsemble`        the members stacked, one batched call (:mod:`funcbnn.swag`'s
                             per-member buffers)
:class:`SWAG`                :func:`funcbnn.swag.update` / ``posterior(form="diag")``
:class:`LaplaceApproximation`  :func:`funcbnn.laplace.diag_curvature` (empirical Fisher)
:class:`VariationalBayesNN`  KL by :func:`funcbnn.families.diag_gaussian`, batched draws
===========================  ==========================================================

Each ``predict`` takes an extra ``generator=`` keyword for reproducible draws.
Where incerto departs from the theory it cites, the class docstring says so
and names the native call.
"""

from __future__ import annotations

import abc
import warnings
from typing import Any, Callable

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import laplace as _laplace
from .. import priors as _priors
from .. import swag as _swag
from .. import tree as _tree
from .._validation import positive_int
from ..families.diag_gaussian import DiagGaussianState, diag_gaussian
from ..model import functionalize
from ..predict import sample_outputs
from ..summary import class_summary
from ._draws import (
    drawing_disabled,
    dropout_outputs,
    functional_form,
    functional_form_with_buffers,
    outputs_at_draws,
    unwrapped,
)

__all__ = [
    "IncertoError",
    "NotFittedError",
    "BaseBayesianMethod",
    "MCDropout",
    "DeepEnsemble",
    "SWAG",
    "LaplaceApproximation",
    "VariationalBayesNN",
    "GaussianLinear",
]

Prediction = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]


class IncertoError(Exception):
    """Base class of incerto's errors."""


class NotFittedError(IncertoError, _laplace.NotFittedError):
    """``predict`` before ``fit`` / ``collect_model`` (also a :class:`funcbnn.laplace.NotFittedError`)."""


def _device_or_default(device: str | torch.device | None) -> str | torch.device:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device is None else device


def _finish(samples: Tensor, normalize_output: bool, return_samples: bool) -> Prediction:
    """incerto's summary of ``(S, N, ...)`` outputs: softmax of 2-D multi-column outputs, mean, unbiased variance."""
    if normalize_output and samples.dim() == 3 and samples.shape[-1] > 1:
        samples = F.softmax(samples, dim=-1)
    mean, variance = samples.mean(dim=0), samples.var(dim=0)
    return (mean, variance, samples) if return_samples else (mean, variance)


def _outputs_at(model: nn.Module, draws: dict[str, Tensor], x: Tensor) -> Tensor:
    """Outputs ``(S, N, ...)`` of ``model`` (eval mode) at weight draws keyed by ``model.named_parameters()``.

    The statistics keep incerto's names, those of the model as passed
    (``_orig_mod.*`` for a compiled one); the functional form runs the module
    inside any wrapper, under its own names.
    """
    _, names = unwrapped(model)
    apply_fn = functional_form(model)
    return sample_outputs(apply_fn, {name: draws[names[name]] for name in apply_fn.params_template}, x)


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class BaseBayesianMethod(nn.Module, abc.ABC):
    """Base class of incerto's Bayesian methods: ``predict(x, return_samples=False) -> (mean, variance[, samples])``.

    The variance is the disagreement between posterior samples (epistemic).
    """

    @abc.abstractmethod
    def predict(self, x: Tensor, return_samples: bool = False, **kwargs: Any) -> Prediction:
        """``(mean, variance)``, or ``(mean, variance, samples)`` with ``return_samples=True``."""


class MCDropout(BaseBayesianMethod):
    """Monte Carlo dropout (Gal & Ghahramani 2016), incerto's wrapper.

    Like incerto, the constructor (and every ``predict``) puts the model's
    dropout layers in train mode and **overwrites their rates** with
    ``dropout_rate`` (default 0.1), whatever rate the model was trained with;
    pass ``dropout_rate=None`` to keep the model's rates, which is what Gal &
    Ghahramani's approximation assumes. The native
    ``funcbnn.mc_dropout.functionalize(model)`` never changes the model.

    Predictions are one batched call with a seeded mask per sample
    (:mod:`funcbnn.mc_dropout`), so ``generator=`` makes them reproducible;
    the other layers run in eval mode (incerto leaves them as they are). The
    seeded masks cover ``nn.Dropout`` and ``nn.Dropout1d/2d/3d``; a model with
    ``AlphaDropout`` is refused.

    Parameters
    ----------
    model : nn.Module
    num_samples : int, default 20
    dropout_rate : float or None, default 0.1

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    >>> mean, variance = MCDropout(net, num_samples=8).predict(torch.randn(5, 4))
    >>> mean.shape, bool(torch.allclose(mean.sum(-1), torch.ones(5)))
    (torch.Size([5, 3]), True)
    """

    def __init__(self, model: nn.Module, num_samples: int = 20, dropout_rate: float | None = 0.1) -> None:
        super().__init__()
        if dropout_rate is not None and not (0 <= dropout_rate < 1):
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        alpha = [
            name
            for name, m in model.named_modules()
            if isinstance(m, (nn.AlphaDropout, nn.FeatureAlphaDropout))
        ]
        if alpha:
            raise NotImplementedError(
                f"MCDropout: alpha dropout layers {alpha} have no seeded-mask implementation in funcbnn; "
                "replace them by nn.Dropout or keep incerto for this model"
            )
        self.model = model
        self.num_samples = num_samples
        self.dropout_rate = dropout_rate
        self._enable_dropout()

    def _dropout_layers(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Dropout3d))]

    def _enable_dropout(self) -> None:
        """incerto's side effect on the model: dropout layers in train mode, rates set to ``dropout_rate``."""
        layers = self._dropout_layers()
        for m in layers:
            m.train()
            if self.dropout_rate is not None:
                m.p = self.dropout_rate
        if not layers:
            warnings.warn(
                "MCDropout: no nn.Dropout layers found in the model. "
                "All forward samples will be identical, yielding zero variance.",
                stacklevel=3,
            )

    def forward(self, x: Tensor) -> Tensor:
        """One forward pass of the model (for training)."""
        return self.model(x)

    def _samples(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return dropout_outputs(
            self.model, x, positive_int(self.num_samples, "num_samples"), generator=generator
        )

    @torch.no_grad()
    def predict(
        self,
        x: Tensor,
        return_samples: bool = False,
        normalize_output: bool = True,
        *,
        generator: torch.Generator | None = None,
    ) -> Prediction:
        """Mean and unbiased variance of ``num_samples`` dropout predictions (softmax of 2-D logits).

        Parameters
        ----------
        x : Tensor
        return_samples : bool, default False
            Also return the ``(num_samples, N, ...)`` predictions.
        normalize_output : bool, default True
            Softmax 2-D multi-column outputs (logits).
        generator : torch.Generator, optional
            Seeds the masks (the global RNG otherwise).
        """
        self._enable_dropout()
        return _finish(self._samples(x, generator), normalize_output, return_samples)

    def predict_entropy(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Entropy of the mean predicted probabilities (total uncertainty), in nats.

        incerto adds 1e-10 inside the log; :func:`funcbnn.summary.class_summary` needs no
        epsilon (``0 log 0 = 0``): the two agree to ~1e-9 per class.
        """
        _, _, samples = self.predict(x, return_samples=True, generator=generator)
        return class_summary(samples.log()).entropy

    def predict_mutual_information(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``H[E p] - E H[p]`` over the dropout samples (epistemic uncertainty, BALD), clamped at 0."""
        _, _, samples = self.predict(x, return_samples=True, generator=generator)
        return class_summary(samples.log()).mutual_info


class DeepEnsemble(BaseBayesianMethod):
    """Deep ensembles (Lakshminarayanan et al. 2017), incerto's container of independently trained members.

    ``predict`` stacks the members' parameters (and buffers) and evaluates them
    in one batched call when they share an architecture, a loop otherwise;
    every member is put in eval mode first, as in incerto. The native way to
    *train* all members at once is :func:`funcbnn.ensemble.fit` (one vmapped step).

    Parameters
    ----------
    model_fn : callable
        Builds one member.
    num_models : int, default 5

    Examples
    --------
    >>> ens = DeepEnsemble(lambda: nn.Linear(4, 3), num_models=3)
    >>> mean, variance, members = ens.predict(torch.randn(5, 4), return_samples=True)
    >>> members.shape
    torch.Size([3, 5, 3])
    """

    def __init__(self, model_fn: Callable[[], nn.Module], num_models: int = 5) -> None:
        super().__init__()
        if not callable(model_fn):
            raise TypeError("model_fn must be callable")
        if num_models < 1:
            raise ValueError(f"num_models must be >= 1, got {num_models}")
        self.num_models = num_models
        self.models = nn.ModuleList([model_fn() for _ in range(num_models)])

    def forward(self, x: Tensor, model_idx: int | None = None) -> Tensor:
        """The output of member ``model_idx``, or the average output of all members."""
        if model_idx is not None:
            return self.models[model_idx](x)
        return torch.stack([model(x) for model in self.models]).mean(dim=0)

    def _member_outputs(self, x: Tensor) -> Tensor:
        # Compiled or (Distributed)DataParallel members: the modules inside, as functionalize runs them.
        members = [unwrapped(m)[0] for m in self.models]
        first = members[0]
        trees = [dict(m.named_parameters()) for m in members]
        same = all(
            type(m) is type(first)
            and all(p.requires_grad for p in tree.values())
            and optree.tree_structure(tree) == optree.tree_structure(trees[0])
            and all(a.shape == b.shape for a, b in zip(tree.values(), trees[0].values()))
            for m, tree in zip(members, trees)
        )
        if not same:  # members of different architectures (or with frozen parts) run one by one
            return torch.stack([m(x) for m in self.models])
        apply_fn = functional_form(first)
        params = _tree.stack(trees)
        if not apply_fn.buffers:
            return sample_outputs(apply_fn, params, x)
        # each member's own buffers (e.g. BatchNorm statistics) ride along with its parameters
        buffers = _tree.stack([dict(m.named_buffers()) for m in members])
        return sample_outputs(functional_form_with_buffers(first), {"params": params, "buffers": buffers}, x)

    @torch.no_grad()
    def predict(
        self,
        x: Tensor,
        return_samples: bool = False,
        return_all: bool = False,
        normalize_output: bool = True,
    ) -> Prediction:
        """Mean and unbiased variance over the members (softmax of 2-D logits).

        Parameters
        ----------
        x : Tensor
        return_samples : bool, default False
            Also return the ``(num_models, N, ...)`` member predictions.
        return_all : bool, default False
            Deprecated alias of ``return_samples``.
        normalize_output : bool, default True
        """
        for model in self.models:
            model.eval()
        return _finish(self._member_outputs(x), normalize_output, return_samples or return_all)

    def train_member(
        self,
        model_idx: int,
        train_loader: Any,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module,
        num_epochs: int = 10,
        device: str | None = None,
    ) -> None:
        """Train member ``model_idx`` with the given optimiser and loss (incerto's plain loop).

        ``device`` defaults to CUDA when available; the member is moved there.
        """
        device = _device_or_default(device)
        model = self.models[model_idx].to(device)
        model.train()
        for _ in range(num_epochs):
            for batch_x, batch_y in train_loader:
                batch_x, batch_y = batch_x.to(device), batch_y.to(device)
                optimizer.zero_grad()
                loss = criterion(model(batch_x), batch_y)
                loss.backward()
                optimizer.step()

    def diversity(self, x: Tensor) -> Tensor:
        """Per-input disagreement: the members' variance averaged over the last axis."""
        _, variance, _ = self.predict(x, return_samples=True)
        return variance.mean(dim=-1)


class SWAG(BaseBayesianMethod):
    """Diagonal SWAG (Maddox et al. 2019), incerto's version.

    ``collect_model`` records an iterate (:func:`funcbnn.swag.update`); the
    posterior is ``N(mean, clamp(sq_mean - mean^2, var_clamp))``
    (:func:`funcbnn.swag.posterior` with ``form="diag"``, ``scale=1``). This is
    incerto's SWAG-diagonal: no low-rank part and no factor 1/2 on the
    covariance. The paper's SWAG is ``funcbnn.swag.posterior(state)``
    (low-rank plus diagonal, scaled by 1/2), with BatchNorm statistics refreshed
    per sample by :func:`funcbnn.swag.bn_update`.

    ``predict`` evaluates the model in eval mode at all samples in one batched
    call; the model's parameters are never overwritten.

    Parameters
    ----------
    model : nn.Module
    num_samples : int, default 20
    var_clamp : float, default 1e-6

    Attributes
    ----------
    mean, sq_mean : dict[str, Tensor]
        Running first and second moments per parameter.
    n_models : int
        Iterates collected.
    """

    def __init__(self, model: nn.Module, num_samples: int = 20, var_clamp: float = 1e-6) -> None:
        super().__init__()
        self.model = model
        self.num_samples = num_samples
        self.var_clamp = var_clamp
        # One deviation column is the least the native state holds; diagonal SWAG never reads it.
        self._state = _swag.init({n: p.detach() for n, p in model.named_parameters()}, max_rank=1)

    @property
    def mean(self) -> dict[str, Tensor]:
        return self._state.mean

    @mean.setter
    def mean(self, value: dict[str, Tensor]) -> None:
        self._state = self._state._replace(mean=dict(value))

    @property
    def sq_mean(self) -> dict[str, Tensor]:
        return self._state.sq_mean

    @sq_mean.setter
    def sq_mean(self, value: dict[str, Tensor]) -> None:
        self._state = self._state._replace(sq_mean=dict(value))

    @property
    def n_models(self) -> int:
        return int(self._state.num_models)

    @n_models.setter
    def n_models(self, value: int) -> None:
        self._state = self._state._replace(num_models=torch.tensor(int(value), dtype=torch.int64))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "SWAG":
        super()._apply(fn, recurse)
        self._state = optree.tree_map(fn, self._state)
        return self

    def collect_model(self, model: nn.Module) -> None:
        """Record the current parameters of ``model`` (same architecture as the wrapped one)."""
        self._state = _swag.update(self._state, {n: p.detach() for n, p in model.named_parameters()})

    def _posterior(self) -> tuple[Any, DiagGaussianState]:
        if self.n_models == 0:
            raise NotFittedError("No models collected. Call collect_model() first.")
        return _swag.posterior(self._state, form="diag", scale=1.0, var_clamp=self.var_clamp)

    def sample_parameters(self, *, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One draw ``{name: tensor}`` from the SWAG posterior."""
        family, q = self._posterior()
        return optree.tree_map(lambda t: t[0], family.sample(q, 1, generator=generator))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped model's state plus ``_swag_mean``, ``_swag_sq_mean`` and ``_swag_n_models``."""
        state = super().state_dict(*args, **kwargs)
        if kwargs.get("prefix", "") == "" and not args:
            state["_swag_mean"] = self.mean
            state["_swag_sq_mean"] = self.sq_mean
            state["_swag_n_models"] = self.n_models
        return state

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Restore the SWAG statistics and the wrapped model's state (the caller's dict is not changed)."""
        state_dict = dict(state_dict)
        mean = state_dict.pop("_swag_mean", {})
        sq_mean = state_dict.pop("_swag_sq_mean", {})
        n_models = state_dict.pop("_swag_n_models", 0)
        fresh = _swag.init({n: p.detach() for n, p in self.model.named_parameters()}, max_rank=1)
        self._state = fresh._replace(
            mean={**fresh.mean, **mean},
            sq_mean={**fresh.sq_mean, **sq_mean},
            num_models=torch.tensor(int(n_models), dtype=torch.int64),
        )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def predict(
        self,
        x: Tensor,
        return_samples: bool = False,
        normalize_output: bool = True,
        *,
        generator: torch.Generator | None = None,
    ) -> Prediction:
        """Mean and unbiased variance over ``num_samples`` weight draws (softmax of 2-D logits).

        Raises
        ------
        NotFittedError
            Before any ``collect_model``.
        """
        family, q = self._posterior()
        draws = family.sample(q, positive_int(self.num_samples, "num_samples"), generator=generator)
        return _finish(_outputs_at(self.model, draws, x), normalize_output, return_samples)


class LaplaceApproximation(BaseBayesianMethod):
    """Diagonal Laplace approximation at the trained weights, incerto's version.

    ``fit`` computes the diagonal empirical Fisher from per-example gradients
    (:func:`funcbnn.laplace.diag_curvature` with ``kind="ef"``) and sets, per
    parameter, ``posterior_precision = prior_precision + EF / N``.

    **Departs from the theory**: the Laplace posterior precision is the
    *sum* over the N examples of the per-example curvature plus the prior
    precision (MacKay 1992; Daxberger et al. 2021). incerto averages instead,
    so its data term is N times too small and the posterior far too wide for
    any real data set. Regression uses the unit-variance Gaussian NLL averaged
    over the D outputs, i.e. curvature / D^2. The principled native call is
    ``funcbnn.laplace.fit(apply_fn, params, loader, "classification",
    structure="diag")`` (GGN by default, prior precision tunable by marginal
    likelihood) or :class:`funcbnn.laplace.LaplaceApproximation`.

    ``predict`` draws ``num_samples`` weight sets from ``N(mean, 1/precision)``
    and evaluates them in one batched call (model in eval mode); the model's
    parameters are never overwritten.

    Parameters
    ----------
    model : nn.Module
        Trained to a MAP estimate.
    likelihood : {"classification", "regression"}
    prior_precision : float, default 1.0
    num_samples : int, default 20

    Attributes
    ----------
    mean, posterior_precision : dict[str, Tensor] or None
        Set by :meth:`fit`.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str = "classification",
        prior_precision: float = 1.0,
        num_samples: int = 20,
    ) -> None:
        super().__init__()
        self.model = model
        self.likelihood = likelihood
        self.prior_precision = prior_precision
        self.num_samples = num_samples
        self.posterior_precision: dict[str, Tensor] | None = None
        self.mean: dict[str, Tensor] | None = None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "LaplaceApproximation":
        super()._apply(fn, recurse)
        if self.mean is not None:
            self.mean = {name: fn(t) for name, t in self.mean.items()}
        if self.posterior_precision is not None:
            self.posterior_precision = {name: fn(t) for name, t in self.posterior_precision.items()}
        return self

    def _compute_hessian_diag(self, data_loader: Any, device: str | None = None) -> dict[str, Tensor]:
        """incerto's Hessian diagonal: the empirical Fisher averaged over the examples."""
        device = _device_or_default(device)
        self.model.to(device)
        self.model.eval()
        apply_fn, params, _ = functionalize(self.model)
        _, names = unwrapped(self.model)  # the curvature comes under functionalize's names
        regression = self.likelihood != "classification"
        outputs_per_example = []

        def batches():
            for batch_x, batch_y in data_loader:
                batch_x, batch_y = batch_x.to(device), batch_y.to(device)
                if regression:
                    batch_y = batch_y.float()
                    batch_y = batch_y.unsqueeze(-1) if batch_y.dim() == 1 else batch_y
                    outputs_per_example.append(batch_y[0].numel())
                yield batch_x, batch_y

        diag, stats = _laplace.diag_curvature(
            apply_fn, params, batches(), "gaussian" if regression else "categorical", kind="ef"
        )
        # incerto's per-example loss is 0.5 * mean over the D outputs (1/D of the Gaussian NLL): curvature / D^2.
        scale = 1.0 / stats.num_data / (outputs_per_example[0] ** 2 if regression else 1)
        diag = {names[name]: d for name, d in diag.items()}
        return {
            name: diag[name] * scale if name in diag else torch.zeros_like(p)
            for name, p in self.model.named_parameters()
        }

    def fit(self, data_loader: Any, device: str | None = None) -> None:
        """Store the current weights as the mean and compute the posterior precision.

        Parameters
        ----------
        data_loader : iterable of (x, y)
        device : str, optional
            Where to compute (default CUDA when available); the model is moved there.
        """
        device = _device_or_default(device)
        self.model.to(device)
        self.mean = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        hessian_diag = self._compute_hessian_diag(data_loader, device)
        self.posterior_precision = {name: self.prior_precision + h for name, h in hessian_diag.items()}

    @torch.no_grad()
    def predict(
        self,
        x: Tensor,
        return_samples: bool = False,
        normalize_output: bool = True,
        *,
        generator: torch.Generator | None = None,
    ) -> Prediction:
        """Mean and unbiased variance over ``num_samples`` draws from ``N(mean, 1/precision)``.

        Raises
        ------
        NotFittedError
            Before :meth:`fit`.
        """
        if self.mean is None or self.posterior_precision is None:
            raise NotFittedError("Model not fitted. Call fit() first.")
        family = diag_gaussian()
        q = family.from_moments(self.mean, {n: p.rsqrt() for n, p in self.posterior_precision.items()})
        draws = family.sample(q, positive_int(self.num_samples, "num_samples"), generator=generator)
        return _finish(_outputs_at(self.model, draws, x), normalize_output, return_samples)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped model's state plus the ``_laplace_*`` statistics and settings."""
        state = super().state_dict(*args, **kwargs)
        if kwargs.get("prefix", "") == "" and not args:
            state["_laplace_mean"] = self.mean
            state["_laplace_posterior_precision"] = self.posterior_precision
            state["_laplace_likelihood"] = self.likelihood
            state["_laplace_prior_precision"] = self.prior_precision
            state["_laplace_num_samples"] = self.num_samples
        return state

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Restore the statistics, settings and the wrapped model's state (the caller's dict is not changed)."""
        state_dict = dict(state_dict)
        self.mean = state_dict.pop("_laplace_mean", None)
        self.posterior_precision = state_dict.pop("_laplace_posterior_precision", None)
        self.likelihood = state_dict.pop("_laplace_likelihood", "classification")
        self.prior_precision = state_dict.pop("_laplace_prior_precision", 1.0)
        self.num_samples = state_dict.pop("_laplace_num_samples", 20)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class GaussianLinear(nn.Module):
    """incerto's mean-field Gaussian linear layer (Blundell et al. 2015).

    ``weight_mu ~ prior_std * N(0, 1)`` (global RNG), ``bias_mu = 0`` and
    ``rho = inverse_softplus(prior_std)``, so the posterior starts with the
    prior's std. ``forward`` draws ``mu + softplus(rho) * eps`` for the weight,
    then the bias (:func:`funcbnn.tree.diag_normal`, incerto's RNG stream);
    ``kl_divergence`` is the analytic KL to ``N(0, prior_std^2)`` of
    :func:`funcbnn.families.diag_gaussian`.

    Parameters
    ----------
    in_features, out_features : int
    prior_std : float, default 1.0
    """

    def __init__(self, in_features: int, out_features: int, prior_std: float = 1.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.prior_std = prior_std
        init_rho = torch.log(torch.tensor(prior_std).exp() - 1).item()
        self.weight_mu = nn.Parameter(torch.randn(out_features, in_features) * prior_std)
        self.weight_rho = nn.Parameter(torch.full((out_features, in_features), init_rho))
        self.bias_mu = nn.Parameter(torch.zeros(out_features))
        self.bias_rho = nn.Parameter(torch.full((out_features,), init_rho))

    def _state(self) -> DiagGaussianState:
        return DiagGaussianState(
            {"weight": self.weight_mu, "bias": self.bias_mu},
            {"weight": self.weight_rho, "bias": self.bias_rho},
        )

    def stds(self) -> dict[str, Tensor]:
        """Posterior stds keyed by the mean parameters' names."""
        return {"weight_mu": F.softplus(self.weight_rho), "bias_mu": F.softplus(self.bias_rho)}

    def forward(self, x: Tensor) -> Tensor:
        """``x W^T + b`` at a fresh draw of ``W`` and ``b``."""
        if drawing_disabled():  # batched prediction: the means hold the draws
            return F.linear(x, self.weight_mu, self.bias_mu)
        weight = _tree.diag_normal(self.weight_mu, F.softplus(self.weight_rho))
        bias = _tree.diag_normal(self.bias_mu, F.softplus(self.bias_rho))
        return F.linear(x, weight, bias)

    def kl_divergence(self) -> Tensor:
        """``KL(q || N(0, prior_std^2))`` of the weight and bias, analytic."""
        return diag_gaussian().kl(self._state(), _priors.gaussian(std=self.prior_std))


class VariationalBayesNN(BaseBayesianMethod):
    """incerto's Bayes-by-Backprop MLP: :class:`GaussianLinear` layers with ReLU between them.

    ``variational_loss`` is ``mean NLL + kl_weight * KL / len(x)``, the KL
    divided by the *batch* size. **Departs from the ELBO** (Blundell et al.
    2015): per example the KL enters as ``KL / N`` with N the data-set size,
    so incerto weighs the prior ``N / batch_size`` times too strongly (the
    number of batches per epoch). Pass ``kl_weight=len(x) / N`` for the ELBO,
    or use the native ``funcbnn.vi.elbo`` / ``funcbnn.nn.BayesianModule.elbo(x,
    y, num_data=N)``. Its NLL is cross-entropy: classification only, as in incerto.

    The Monte-Carlo samples of ``variational_loss`` and ``predict`` run as one
    batched call (reparameterised draws; gradients reach ``mu`` and ``rho``).

    Parameters
    ----------
    in_features : int
    hidden_sizes : list of int
    out_features : int
    prior_std : float, default 1.0
    num_samples : int, default 20
        Samples of :meth:`predict`.

    Examples
    --------
    >>> model = VariationalBayesNN(4, [16], 3, num_samples=8)
    >>> loss = model.variational_loss(torch.randn(6, 4), torch.randint(0, 3, (6,)), num_samples=4)
    >>> loss.backward()
    >>> model.predict(torch.randn(2, 4))[0].shape
    torch.Size([2, 3])
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: list[int],
        out_features: int,
        prior_std: float = 1.0,
        num_samples: int = 20,
    ) -> None:
        super().__init__()
        self.prior_std = prior_std
        self.num_samples = num_samples
        sizes = [in_features, *hidden_sizes, out_features]
        self.layers = nn.ModuleList(
            GaussianLinear(a, b, prior_std=prior_std) for a, b in zip(sizes[:-1], sizes[1:])
        )

    def forward(self, x: Tensor) -> Tensor:
        """The network at a fresh weight draw."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x

    def kl_divergence(self) -> Tensor:
        """Sum of the layers' analytic KL terms."""
        return torch.stack([layer.kl_divergence() for layer in self.layers]).sum()

    def _sampled(self, x: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        num_samples = positive_int(num_samples, "num_samples")
        if num_samples == 1 and generator is None:  # one ordinary forward: incerto's own draws
            return self(x).unsqueeze(0)
        stds = {
            f"layers.{i}.{name}": s for i, layer in enumerate(self.layers) for name, s in layer.stds().items()
        }
        return outputs_at_draws(self, stds, x, num_samples, generator=generator)

    def variational_loss(
        self,
        x: Tensor,
        y: Tensor,
        num_samples: int = 10,
        kl_weight: float = 1.0,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``mean over samples of cross_entropy + kl_weight * KL / len(x)`` (see the class note on scaling)."""
        outputs = self._sampled(x, num_samples, generator)
        # The mean over equal-size samples of per-sample mean losses is the mean over all (sample, example) pairs.
        nll = F.cross_entropy(outputs.flatten(0, 1), y.repeat(outputs.shape[0]))
        return nll + kl_weight * self.kl_divergence() / len(x)

    @torch.no_grad()
    def predict(
        self,
        x: Tensor,
        return_samples: bool = False,
        normalize_output: bool = True,
        *,
        generator: torch.Generator | None = None,
    ) -> Prediction:
        """Mean and unbiased variance over ``num_samples`` weight draws (softmax of 2-D logits)."""
        return _finish(self._sampled(x, self.num_samples, generator), normalize_output, return_samples)
