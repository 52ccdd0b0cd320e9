"""Online marginal-likelihood training: the MAP and the hyperparameters together (Immer et al. 2021).

"Scalable Marginal Likelihood Estimation for Model Selection in Deep Learning"
(Immer, Bauer, Fortuin, Rätsch, Khan; ICML 2021), Algorithm 1, as
laplace-torch's ``marglik_training``: train the network on the log joint

``loss = mean_batch nll(f(x), y) / T + 1/(2N) sum_l delta_l ||theta_l - m0||^2``

(the negative log posterior over ``N``, with the current prior precisions
``delta`` and, for regression, the current noise std inside ``nll``), and
every ``marglik_frequency`` epochs after ``burnin`` fit a Laplace
approximation at the current weights and take ``hyper_steps`` Adam steps on
the log hyperparameters up the Laplace marginal likelihood
(:func:`funcbnn.laplace.marglik.log_marglik`). The weights whose Laplace
marginal likelihood was highest are returned with their hyperparameters and
a Laplace approximation fitted there (laplace-torch's early stopping on the
marginal likelihood).

Why it matters: post-hoc tuning on a MAP trained with a fixed, weak weight
decay can only match the prior to that MAP's large weights (its optimum is
about ``(effective number of parameters) / ||theta||^2``), which leaves an
overconfident or an underconfident predictive; training the weights *under*
the prior that the evidence selects lets the two settle together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Callable, Iterable, Literal, NamedTuple

import torch
from torch import Tensor

from .. import distributed
from .._validation import positive_float, positive_int
from ..likelihoods import Likelihood, get_likelihood
from .curvature import Kind, check_batch, check_data, check_targets
from ..checks import DivergedError, check_finite, finite_checks_enabled
from ._guards import check_eval_normalisation, model_call, tensor_output
from .fit import Laplace, check_apply_fn, fit
from .marglik import PRIOR_STRUCTURES, initial_prior_precision, log_marglik
from .state import LaplaceState, as_prior_mean, as_prior_precision, as_sigma, as_temperature, leafwise

__all__ = ["MarglikInfo", "MarglikResult", "marglik_training"]


class MarglikInfo(NamedTuple):
    """The record of :func:`marglik_training`.

    Attributes
    ----------
    loss : Tensor
        ``(epochs,)``: the mean training objective of each epoch (negative log joint over ``N``).
    log_marglik : Tensor
        ``(num_estimates * hyper_steps,)``: the log marginal likelihood at every hyperparameter step.
    prior_precision : Tensor
        ``(num_estimates, ...)``: the prior precision after each marginal-likelihood estimate.
    sigma : Tensor
        ``(num_estimates,)``: the noise std after each estimate (1 without observation noise).
    best_epoch : int
        The epoch (1-based) whose weights are returned; 0 if no estimate ran.
    """

    loss: Tensor
    log_marglik: Tensor
    prior_precision: Tensor
    sigma: Tensor
    best_epoch: int


class MarglikResult(NamedTuple):
    """What :func:`marglik_training` returns: unpack as ``params, la, state, info = ...``."""

    params: dict[str, Tensor]
    laplace: Laplace
    state: LaplaceState
    info: MarglikInfo


def _num_data(data: Any) -> int:
    dataset = getattr(data, "dataset", None)
    if dataset is not None:
        return len(dataset)
    return sum(int(y.shape[0]) for _, y in data)


def _batch_share(y: Tensor, process_group: Any) -> float:
    """This rank's fraction of the global batch (1.0 without a group); empty shares are refused on every rank."""
    if process_group is None:
        return 1.0
    local = int(y.shape[0])
    counts = distributed.all_reduce_tree(torch.tensor([float(local), float(local == 0)]), process_group)
    if counts[1] > 0:
        raise ValueError(f"{int(counts[1])} rank(s) have an empty batch; every rank needs a non-empty share of each batch")
    return local / float(counts[0])


def marglik_training(
    apply_fn: Any,
    params: dict[str, Tensor],
    data: Iterable,
    likelihood: str | Likelihood,
    *,
    structure: Literal["diag", "kron", "full"] = "kron",
    curvature: Kind = "ggn",
    epochs: int = 300,
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
    lr: float = 1e-3,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    prior_structure: Literal["scalar", "layerwise", "diag"] = "layerwise",
    prior_precision: float | Tensor = 1.0,
    prior_mean: float | Tensor | dict[str, Any] = 0.0,
    sigma: float | Tensor = 1.0,
    tune_sigma: bool | None = None,
    temperature: float | Tensor = 1.0,
    lr_hyp: float = 0.1,
    hyper_steps: int = 10,
    marglik_frequency: int = 1,
    burnin: int = 0,
    num_data: int | None = None,
    joint_bias: bool = True,
    callback: Callable[[int, dict[str, Tensor], LaplaceState | None], None] | None = None,
    process_group: Any = None,
) -> MarglikResult:
    """Train the MAP and the prior precisions (and the noise) by the Laplace marginal likelihood.

    Parameters
    ----------
    apply_fn, params
        From :func:`funcbnn.functionalize` (not the ``nn.Module``); ``params``
        are the initial weights and are not modified.
    data : iterable of (x, y)
        Training batches, iterated once per epoch (a ``DataLoader`` or any
        re-iterable loader may shuffle, and is reshuffled each epoch; a
        one-shot iterator is read into a list once). All of it: the Laplace
        fits sum curvature over it.
    likelihood : str or Likelihood
        ``"classification"``, ``"regression"`` (noise tuned), ``"bernoulli"``, ...
    structure, curvature, joint_bias
        Of the Laplace approximations (:func:`funcbnn.laplace.fit`); ``"kron"``
        as laplace-torch's default.
    epochs : int
        Passes over ``data``.
    optimizer : callable, optional
        ``optimizer(list_of_leaves) -> torch.optim.Optimizer`` (its weight decay
        must be 0: the prior is the weight decay); default Adam with ``lr``.
        Each step passes a closure, so L-BFGS works too.
    lr : float
        Learning rate of the default Adam.
    scheduler : callable, optional
        ``scheduler(optimizer)``, stepped after every batch.
    prior_structure : {"scalar", "layerwise", "diag"}
        One prior precision, one per leaf (laplace-torch's "layerwise", the
        default), or one per parameter (not with ``"kron"``).
    prior_precision, prior_mean, sigma, temperature
        Initial prior precision, the prior mean, initial noise std (regression)
        and the likelihood temperature (fixed).
    tune_sigma : bool, optional
        Tune the noise std; by default whenever the likelihood has one.
    lr_hyp, hyper_steps
        Adam learning rate of the log hyperparameters, and steps per estimate.
    marglik_frequency, burnin
        Estimate every ``marglik_frequency`` epochs, from epoch ``burnin`` on.
    num_data : int, optional
        ``N``; by default ``len(data.dataset)`` or the examples in one pass.
    callback : callable, optional
        ``callback(epoch, params, state_or_None)`` after each epoch (the
        state when an estimate ran that epoch); for logging.
    process_group : torch.distributed group, optional
        Data-parallel training: ``data`` is this rank's shard (the same number
        of non-empty batches on every rank), gradients are combined weighted by
        the ranks' batch sizes, the Laplace fits sum curvature over the shards
        (:func:`funcbnn.laplace.fit`), and every rank ends with the one-process
        result on the concatenated batches.

    Returns
    -------
    MarglikResult
        ``(params, laplace, state, info)``: the weights of the best marginal
        likelihood, the Laplace approximation fitted there with the tuned
        hyperparameters, and a :class:`MarglikInfo`.

    Examples
    --------
    >>> import funcbnn, torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> x = torch.randn(64, 2); y = (x[:, 0] > 0).long()
    >>> apply_fn, params, _ = funcbnn.functionalize(nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)))
    >>> params, la, state, info = marglik_training(apply_fn, params, [(x, y)], "classification", epochs=20, lr=1e-2)
    >>> state.prior_precision.shape, info.loss.shape
    (torch.Size([4]), torch.Size([20]))
    """
    check_apply_fn(apply_fn)
    check_eval_normalisation(apply_fn, "marglik_training")
    lik = get_likelihood(likelihood)
    positive_int(epochs, "epochs")
    positive_float(lr, "lr")
    positive_float(lr_hyp, "lr_hyp")
    positive_int(hyper_steps, "hyper_steps")
    positive_int(marglik_frequency, "marglik_frequency")
    if not isinstance(burnin, int) or burnin < 0:
        raise ValueError(f"burnin must be a non-negative int, got {burnin!r}")
    if prior_structure not in PRIOR_STRUCTURES:
        raise ValueError(f"prior_structure must be one of {list(PRIOR_STRUCTURES)}, got {prior_structure!r}")
    if structure == "kron" and prior_structure == "diag":
        raise ValueError("prior_structure='diag' (one precision per parameter) does not work with structure='kron'")
    if not isinstance(params, dict) or not params:
        raise TypeError("params must be a non-empty dict of tensors")
    check_finite(params, "params")
    tune_sigma = (lik.sigma is not None) if tune_sigma is None else tune_sigma
    if tune_sigma and lik.sigma is None:
        raise ValueError(f"tune_sigma applies to the 'gaussian' likelihood only, not {lik.name!r}")
    ref = next(iter(params.values()))
    if isinstance(data, Iterator) or (isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor)):
        # An iterator would be spent after one epoch (and a single (x, y) pair is one batch): read it once.
        # Anything re-iterable (a DataLoader, a custom loader that reshuffles) is iterated every epoch.
        data = check_data(data)
    checked = isinstance(data, list)  # check_data's list: its batches were checked once
    n = positive_int(num_data, "num_data") if num_data is not None else _num_data(data)
    if n == 0:
        raise ValueError("data is empty: the loader yielded no examples")
    if process_group is not None and num_data is None:  # the shards add up to the data set
        n = int(distributed.all_reduce_tree(torch.tensor(float(n)), process_group))
    mean0 = {k: v.detach() for k, v in params.items()}
    temp = as_temperature(temperature, ref).detach()
    pm = leafwise(as_prior_mean(prior_mean, mean0, ref).detach(), mean0)
    pp0 = as_prior_precision(prior_precision, mean0, ref).detach()
    log_pp = initial_prior_precision(pp0, mean0, prior_structure).log().clone().requires_grad_(True)
    sd0 = as_sigma(sigma if lik.sigma is not None else 1.0, ref)
    if lik.sigma is None and float(sd0) != 1.0:
        raise ValueError(f"sigma applies to the 'gaussian' likelihood only, not {lik.name!r}")
    log_sd = sd0.detach().log().clone().requires_grad_(tune_sigma)
    hyper_opt = torch.optim.Adam([log_pp] + ([log_sd] if tune_sigma else []), lr=lr_hyp)

    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    leaves = list(theta.values())
    opt = optimizer(leaves) if optimizer is not None else torch.optim.Adam(leaves, lr=lr)
    for group in opt.param_groups:
        if group.get("weight_decay", 0):
            raise ValueError("the optimizer's weight_decay must be 0: marglik_training's prior is the weight decay")
    sched = scheduler(opt) if scheduler is not None else None

    def train_lik() -> Likelihood:
        return get_likelihood("gaussian", sigma=float(log_sd.detach().exp())) if lik.sigma is not None else lik

    losses: list[float] = []
    margliks: list[float] = []
    pp_path: list[Tensor] = []
    sd_path: list[Tensor] = []
    best = (-float("inf"), None, None, None, 0)  # (marglik, params, prior precision, sigma, epoch)
    for epoch in range(1, epochs + 1):
        delta = leafwise(log_pp.detach().exp(), mean0)
        nll_fn = train_lik()
        epoch_loss, seen = 0.0, 0
        for i, batch in enumerate(data):
            if not checked:  # a re-iterable loader's batches are new each epoch
                check_batch(batch, i)
            x, y = batch
            share = _batch_share(y, process_group)

            def closure() -> Tensor:
                opt.zero_grad()
                with model_call(x, theta, f"x of data batch {i}"):
                    f = apply_fn(theta, x)
                f = tensor_output(f, "marglik_training")
                if epoch == 1:  # the targets' range check syncs with the device: once per batch is enough
                    check_targets(lik, f, y, i)
                nll = nll_fn.nll(f, y).mean() / temp
                prior = sum((delta[k] * (theta[k] - pm[k]).square()).sum() for k in theta)
                loss = nll + 0.5 * prior / n
                loss.backward()
                if process_group is not None:
                    # data-parallel: this rank's batch is a share of the global batch (weights sum to 1)
                    grads = distributed.all_reduce_tree([p.grad * share for p in leaves], process_group)
                    for p, g in zip(leaves, grads):
                        p.grad = g
                    loss = distributed.all_reduce_tree(loss.detach() * share, process_group)
                # Before the optimiser writes a non-finite update into the parameters (after the
                # all-reduce, so that every rank decides alike).
                if finite_checks_enabled() and not math.isfinite(float(loss.detach())):
                    raise DivergedError(
                        f"marglik_training: the loss became {float(loss.detach())} at epoch {epoch}, data batch {i}; "
                        "the optimiser did not step, error.state is the parameters this step started from. "
                        "Lower lr, or check the data and the initial parameters",
                        step=epoch,
                        state={k: v.detach().clone() for k, v in theta.items()},
                    )
                return loss

            loss = opt.step(closure)
            if sched is not None:
                sched.step()
            batch = int(y.shape[0])
            epoch_loss += float(loss.detach()) * batch
            seen += batch
        losses.append(epoch_loss / max(seen, 1))

        state = None
        if epoch % marglik_frequency == 0 and epoch >= burnin:
            current = {k: v.detach().clone() for k, v in theta.items()}
            with torch.no_grad():
                _, state = fit(
                    apply_fn, current, data, lik, structure=structure, curvature=curvature,
                    prior_precision=log_pp.detach().exp(), prior_mean=prior_mean, temperature=temp,
                    sigma=log_sd.detach().exp(), joint_bias=joint_bias, process_group=process_group,
                )
            for _ in range(hyper_steps):
                hyper_opt.zero_grad()
                value = log_marglik(state, lik, log_pp.exp(), log_sd.exp())
                margliks.append(float(value.detach()))  # the host sync the history needs anyway
                if finite_checks_enabled() and not math.isfinite(margliks[-1]):
                    raise DivergedError(
                        f"marglik_training: the log marginal likelihood became {margliks[-1]} at epoch {epoch} "
                        "(the weights or hyperparameters diverged); error.state is the parameters at this "
                        "epoch's estimate. Lower lr or lr_hyp",
                        step=epoch,
                        state=current,
                    )
                (-value).backward()
                hyper_opt.step()
            pp_path.append(log_pp.detach().exp().clone())
            sd_path.append(log_sd.detach().exp().clone())
            if margliks[-1] > best[0]:
                best = (margliks[-1], current, pp_path[-1], sd_path[-1], epoch)
        if callback is not None:
            callback(epoch, {k: v.detach() for k, v in theta.items()}, state)

    _, best_params, best_pp, best_sd, best_epoch = best
    if best_params is None:  # no estimate ran (burnin beyond epochs): the final weights, the current values
        best_params = {k: v.detach().clone() for k, v in theta.items()}
        best_pp, best_sd = log_pp.detach().exp(), log_sd.detach().exp()
    la, state = fit(
        apply_fn, best_params, data, lik, structure=structure, curvature=curvature, prior_precision=best_pp,
        prior_mean=prior_mean, temperature=temp, sigma=best_sd, joint_bias=joint_bias, process_group=process_group,
    )
    stack = (lambda xs: torch.stack(xs)) if pp_path else (lambda xs: torch.empty(0, dtype=ref.dtype))
    info = MarglikInfo(
        loss=torch.tensor(losses, dtype=ref.dtype),
        log_marglik=torch.tensor(margliks, dtype=ref.dtype),
        prior_precision=stack(pp_path),
        sigma=stack(sd_path),
        best_epoch=best_epoch,
    )
    return MarglikResult({k: v.clone() for k, v in best_params.items()}, la, state, info)
