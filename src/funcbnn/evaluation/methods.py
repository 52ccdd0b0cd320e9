"""The methods under evaluation, each a function ``fit(context) -> predictor`` built on funcbnn's public API.

Every method trains on ``split.x_train`` from the same network recipe and the
same training budget (:class:`Recipe`); the validation part serves only the
post-hoc choices named below. A predictor maps inputs to a :class:`Prediction`.

========================  ===============================================================================
``map``                   Adam with weight decay (the point estimate every Bayesian method should beat)
``mc_dropout``            the same net with dropout, trained with it on; masks seeded (Gal & Ghahramani 2016)
``ensemble``              5 members under one ``vmap``; regression: mean-and-variance members with
                          adversarial training (Lakshminarayanan et al. 2017)
``bbb``                   Bayes-by-Backprop from a fresh initialisation (Blundell et al. 2015)
``bbb_map``               Bayes-by-Backprop centred on the MAP weights
``laplace_kron_ll``       last-layer Kronecker GGN Laplace, GLM predictive, prior (and noise) by
                          post-hoc marginal likelihood (Daxberger et al. 2021)
``laplace_diag``          all-weights diagonal GGN Laplace, GLM predictive, post-hoc marginal likelihood
``laplace_val``           last-layer Kronecker Laplace, prior precision by validation NLL (a grid over
                          one linearisation)
``laplace_marglik``       online marginal-likelihood training (Immer et al. 2021) where
                          ``funcbnn.laplace.marglik_training`` exists, else post-hoc marginal likelihood on
                          a MAP trained without weight decay (so the prior comes from the evidence only)
``swag``                  SWAG from the MAP (Maddox et al. 2019)
``multiswag``             three SWAG runs from three independent MAPs (Wilson & Izmailov 2020)
========================  ===============================================================================

Regression methods whose networks predict a mean only get their observation
noise from the validation set (the noise std that maximises the validation
likelihood of their own predictive), except Laplace, whose marginal likelihood
tunes it, and the ensemble, whose members predict it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import optree
import torch
from torch import Tensor, nn

import funcbnn
from funcbnn import ensemble, families, laplace, mc_dropout, metrics, priors, swag, vi

from .datasets import Split

__all__ = ["Recipe", "Problem", "Prediction", "Context", "METHODS", "method_names"]


class Recipe(NamedTuple):
    """Network and training budget shared by every method on a task."""

    hidden: tuple[int, ...] = (50,)
    activation: str = "relu"
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-2
    weight_decay: float = 1e-4
    dropout: float = 0.05
    num_samples: int = 32
    vi_epochs: int = 120
    swag_epochs: int = 20
    swag_lr: float = 1e-2
    ensemble_size: int = 5
    ensemble_lr: float = 1e-2
    adversarial: bool = True
    prior_std: float = 1.0


class Problem(NamedTuple):
    """A task's data and recipe: ``kind`` is ``"regression"``, ``"classification"`` or ``"binary"``."""

    kind: str
    split: Split
    num_outputs: int
    recipe: Recipe
    device: torch.device = torch.device("cpu")


class Prediction(NamedTuple):
    """A method's predictive distribution on some inputs.

    Classification and binary tasks fill ``probs`` ``(N, C)``; regression
    (standardised units) fills ``mean``, ``epistemic_var`` and ``noise_var``
    ``(N,)``, and, for Monte-Carlo predictives, the mixture components
    ``component_means`` ``(S, N)`` and ``component_vars`` (whose mixture NLL is
    then the method's NLL; otherwise the Gaussian ``N(mean, epistemic + noise)``).
    """

    probs: Tensor | None = None
    mean: Tensor | None = None
    epistemic_var: Tensor | None = None
    noise_var: Tensor | None = None
    component_means: Tensor | None = None
    component_vars: Tensor | None = None

    @property
    def total_var(self) -> Tensor:
        return self.epistemic_var + self.noise_var


Predictor = Callable[[Tensor], Prediction]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def build_net(d_in: int, d_out: int, recipe: Recipe, *, dropout: float = 0.0) -> nn.Module:
    """An MLP ``d_in - hidden... - d_out`` with the recipe's activation, optionally dropout after each hidden layer."""
    layers: list[nn.Module] = []
    width = d_in
    for h in recipe.hidden:
        layers += [nn.Linear(width, h), _ACTIVATIONS[recipe.activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


def _likelihood(kind: str) -> str:
    return {"regression": "regression", "classification": "classification", "binary": "binary"}[kind]


class _Batches:
    """A re-iterable of shuffled minibatches (a fresh permutation from ``generator`` every pass)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=self.generator).to(self.y.device)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]


class Context:
    """One (task, split, seed): the problem, a generator per use, and the MAP shared by the methods built on it.

    Networks are initialised on the CPU (so a seed gives the same initial weights on every device) and
    their parameters moved to ``problem.device``; data orders, initialisation seeds and dropout-mask
    seeds come from CPU generators (:meth:`generator`), weight draws from generators on the device
    (:meth:`draws`), seeded alike, so on the CPU both are the same stream.
    """

    def __init__(self, problem: Problem, seed: int) -> None:
        self.problem = problem
        self.seed = seed
        self._map: tuple[Any, dict[str, Tensor]] | None = None

    def _seed_of(self, salt: str) -> int:
        h = self.seed * 1_000_003
        for ch in salt:
            h = (h * 31 + ord(ch)) % (2**61 - 1)
        return h

    def generator(self, salt: str) -> torch.Generator:
        """A CPU generator seeded from the context's seed and ``salt`` (stable across runs and Python versions)."""
        return torch.Generator().manual_seed(self._seed_of(salt))

    def draws(self, salt: str) -> torch.Generator:
        """Like :meth:`generator`, on the problem's device: for weight draws and VI's noise."""
        return torch.Generator(self.problem.device).manual_seed(self._seed_of(salt))

    def to_device(self, tree: Any) -> Any:
        """``tree`` with every tensor moved to the problem's device."""
        return optree.tree_map(lambda t: t.to(self.problem.device), tree)

    def fresh_net(self, salt: str, *, outputs: int | None = None, dropout: float = 0.0) -> nn.Module:
        p = self.problem
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=self.generator(salt))))
            return build_net(p.split.x_train.shape[1], outputs or p.num_outputs, p.recipe, dropout=dropout)

    def map(self) -> tuple[Any, dict[str, Tensor]]:
        """``(apply_fn, params)`` of the MAP network (trained once per context)."""
        if self._map is None:
            apply_fn, params, _ = funcbnn.functionalize(self.fresh_net("map"))
            params = train(apply_fn, self.to_device(params), self.problem, self.generator("map-data"))
            self._map = (apply_fn, params)
        return self._map


def train(
    apply_fn: Callable,
    params: dict[str, Tensor],
    problem: Problem,
    generator: torch.Generator,
    *,
    weight_decay: float | None = None,
    seeded_dropout: bool = False,
) -> dict[str, Tensor]:
    """Adam on the batch-mean NLL (with weight decay) for the recipe's epochs; dropout masks drawn from ``generator``."""
    r, s = problem.recipe, problem.split
    lik = funcbnn.likelihoods.get_likelihood(_likelihood(problem.kind))
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(
        theta.values(), lr=r.lr, weight_decay=r.weight_decay if weight_decay is None else weight_decay
    )
    for _ in range(r.epochs):
        for xb, yb in _Batches(s.x_train, s.y_train, r.batch_size, generator):
            if seeded_dropout:
                seed = torch.randint(0, 2**31 - 1, (), generator=generator).to(problem.device)
                out = apply_fn({"params": theta, "seed": seed}, xb)
            else:
                out = apply_fn(theta, xb)
            loss = lik.nll(out, yb).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach() for k, v in theta.items()}


# --- turning outputs into predictions -----------------------------------------------------------


def _noise_from_validation(component_means: Tensor, y_val: Tensor) -> Tensor:
    """The observation noise variance maximising the validation likelihood of a mixture over ``(S, N)`` means."""
    # noise std in standardised units
    grid = torch.logspace(-2.5, 1.0, 141, dtype=component_means.dtype, device=component_means.device)
    means = component_means.unsqueeze(1).expand(-1, len(grid), -1)  # (S, G, N)
    nll = metrics.gaussian_mixture_nll(means, (grid**2).reshape(1, -1, 1), y_val.reshape(-1))
    return grid[nll.argmin()] ** 2


def _mc_regression(outputs: Tensor, noise_var: Tensor) -> Prediction:
    means = outputs.reshape(outputs.shape[0], -1)  # (S, N)
    epistemic = means.var(0, correction=0)
    return Prediction(
        mean=means.mean(0),
        epistemic_var=epistemic,
        noise_var=noise_var.expand_as(epistemic),
        component_means=means,
        component_vars=noise_var,
    )


def _mc_classification(outputs: Tensor, kind: str) -> Prediction:
    return Prediction(probs=funcbnn.summarize(outputs, _likelihood(kind)).probs)


def _mc_predictor(problem: Problem, outputs_of: Callable[[Tensor], Tensor]) -> Predictor:
    """A predictor from a function giving ``(S, N, ...)`` Monte-Carlo outputs; regression noise from validation."""
    if problem.kind != "regression":
        return lambda x: _mc_classification(outputs_of(x), problem.kind)
    val_means = outputs_of(problem.split.x_val).reshape(-1, len(problem.split.y_val))
    noise = _noise_from_validation(val_means, problem.split.y_val)
    return lambda x: _mc_regression(outputs_of(x), noise)


def _sampled(apply_fn: Callable, samples: Any) -> Callable[[Tensor], Tensor]:
    def outputs_of(x: Tensor) -> Tensor:
        with torch.no_grad():
            return funcbnn.sample_outputs(apply_fn, samples, x, method="vmap")

    return outputs_of


# --- the methods --------------------------------------------------------------------------------


def fit_map(ctx: Context) -> Predictor:
    apply_fn, params = ctx.map()
    one = optree.tree_map(lambda t: t.unsqueeze(0), params)
    return _mc_predictor(ctx.problem, _sampled(apply_fn, one))


def fit_mc_dropout(ctx: Context) -> Predictor:
    p = ctx.problem
    apply_fn, params, _ = mc_dropout.functionalize(ctx.fresh_net("mc_dropout", dropout=p.recipe.dropout))
    params = train(apply_fn, ctx.to_device(params), p, ctx.generator("mc_dropout-data"), seeded_dropout=True)
    post = families.dropout()
    draws = post.sample(post.init(params), p.recipe.num_samples, generator=ctx.generator("mc_dropout-masks"))
    return _mc_predictor(p, _sampled(apply_fn, draws))


def fit_ensemble(ctx: Context) -> Predictor:
    p, r = ctx.problem, ctx.problem.recipe
    regression = p.kind == "regression"
    net = ctx.fresh_net("ensemble", outputs=2 * p.num_outputs if regression else None)
    apply_fn, _, _ = funcbnn.functionalize(net)
    members = ensemble.init_members(net, r.ensemble_size, generator=ctx.generator("ensemble-init"))
    members = type(members)(ctx.to_device(members.members))
    x = p.split.x_train
    eps = 0.01 * float((x.max(0).values - x.min(0).values).mean()) if (regression and r.adversarial) else 0.0
    result = ensemble.fit(
        apply_fn,
        members,
        (x, p.split.y_train),
        "heteroscedastic_regression" if regression else _likelihood(p.kind),
        epochs=r.epochs,
        batch_size=r.batch_size,
        optimizer=lambda leaves: torch.optim.Adam(leaves, lr=r.ensemble_lr, weight_decay=r.weight_decay),
        adversarial_eps=eps,
        generator=ctx.generator("ensemble-data"),
        method="vmap",
    )
    outputs_of = _sampled(apply_fn, result.state.members)
    if not regression:
        return lambda xs: _mc_classification(outputs_of(xs), p.kind)

    def predict(xs: Tensor) -> Prediction:
        # the paper's combination: the mixture's moment-matched Gaussian (summarize's heteroscedastic summary)
        s = funcbnn.summarize(outputs_of(xs), "heteroscedastic")
        return Prediction(
            mean=s.mean.reshape(-1),
            epistemic_var=s.epistemic_var.reshape(-1),
            noise_var=s.aleatoric_var.reshape(-1),
        )

    return predict


def _vi(ctx: Context, *, centred: bool) -> Predictor:
    p, r = ctx.problem, ctx.problem.recipe
    name = "bbb_map" if centred else "bbb"
    if centred:  # the means start at the MAP weights
        apply_fn, params = ctx.map()
    else:  # the means start at a fresh initialisation of the network's own scheme
        apply_fn, params, _ = funcbnn.functionalize(ctx.fresh_net(name))
        params = ctx.to_device(params)
    post = families.diag_gaussian(init_std=1e-3)
    lik: Any = _likelihood(p.kind)
    if p.kind == "regression":
        # the likelihood's noise: the MAP's validation estimate (VI here does not learn it)
        map_fn, map_params = ctx.map()
        with torch.no_grad():
            resid = map_fn(map_params, p.split.x_val) - p.split.y_val
        lik = funcbnn.likelihoods.get_likelihood(
            "regression", sigma=float(resid.square().mean().sqrt().clamp_min(1e-3))
        )
    prior = priors.gaussian(std=r.prior_std)
    result = vi.fit(
        apply_fn,
        post,
        prior,
        post.init(params),
        (p.split.x_train, p.split.y_train),
        epochs=r.vi_epochs,
        batch_size=r.batch_size,
        lr=r.lr,
        likelihood=lik,
        num_samples=1,
        generator=ctx.draws(name + "-data"),
        method="loop",
    )
    samples = post.sample(result.state, r.num_samples, generator=ctx.draws(name + "-draws"))
    return _mc_predictor(p, _sampled(apply_fn, samples))


def fit_bbb(ctx: Context) -> Predictor:
    return _vi(ctx, centred=False)


def fit_bbb_map(ctx: Context) -> Predictor:
    return _vi(ctx, centred=True)


def _laplace_predictor(problem: Problem, la: Any, state: Any) -> Predictor:
    if problem.kind == "regression":

        def predict(x: Tensor) -> Prediction:
            with torch.no_grad():
                f, var = la.predict(state, x)
            noise = state.sigma.detach() ** 2
            f, var = f.reshape(-1), var.reshape(-1)
            return Prediction(mean=f, epistemic_var=(var - noise).clamp_min(0), noise_var=noise.expand_as(f))

        return predict

    def predict_probs(x: Tensor) -> Prediction:
        with torch.no_grad():
            probs = la.predict(state, x)
        if problem.kind == "binary":
            p1 = probs.reshape(-1)
            probs = torch.stack([1 - p1, p1], -1)
        return Prediction(probs=probs)

    return predict_probs


def _laplace_fit(ctx: Context, apply_fn: Any, params: dict[str, Tensor], **kw: Any) -> tuple[Any, Any]:
    p = ctx.problem
    data = [(p.split.x_train, p.split.y_train)]
    return laplace.fit(apply_fn, params, data, _likelihood(p.kind), **kw)


def fit_laplace_kron_ll(ctx: Context) -> Predictor:
    apply_fn, params = ctx.map()
    la, state = _laplace_fit(ctx, apply_fn, params, subset="last_layer", structure="kron")
    return _laplace_predictor(ctx.problem, la, la.tune(state))


def fit_laplace_diag(ctx: Context) -> Predictor:
    apply_fn, params = ctx.map()
    la, state = _laplace_fit(ctx, apply_fn, params, subset="all", structure="diag")
    return _laplace_predictor(ctx.problem, la, la.tune(state))


def _val_nll(problem: Problem, la: Any, state: Any, lin: Any, pp: Tensor) -> float:
    s = problem.split
    with torch.no_grad():
        out = la.predict(state, lin, prior_precision=pp)
    if problem.kind == "regression":
        f, var = out
        return float(metrics.gaussian_nll(f.reshape(-1), var.reshape(-1), s.y_val.reshape(-1)))
    if problem.kind == "binary":
        p1 = out.reshape(-1).clamp(0, 1)
        out = torch.stack([1 - p1, p1], -1)
        return float(metrics.nll(out, s.y_val.reshape(-1).long()))
    return float(metrics.nll(out, s.y_val))


def fit_laplace_val(ctx: Context) -> Predictor:
    apply_fn, params = ctx.map()
    p = ctx.problem
    la, state = _laplace_fit(ctx, apply_fn, params, subset="last_layer", structure="kron")
    state = la.tune(state)  # the noise (regression) and a starting point
    lin = la.linearize(state, p.split.x_val)
    base = float(state.prior_precision.reshape(-1)[0])
    ref = state.prior_precision
    grid = base * torch.logspace(-2, 4, 25, dtype=ref.dtype, device=ref.device)
    scores = [_val_nll(p, la, state, lin, pp.reshape(())) for pp in grid]
    best = grid[min(range(len(grid)), key=scores.__getitem__)]
    return _laplace_predictor(
        p, la, state._replace(prior_precision=best.reshape(()).to(state.prior_precision.dtype))
    )


def fit_laplace_marglik(ctx: Context) -> Predictor:
    p = ctx.problem
    training = getattr(laplace, "marglik_training", None)
    apply_fn, params, _ = funcbnn.functionalize(ctx.fresh_net("laplace_marglik"))
    params = ctx.to_device(params)
    if training is not None:  # issue 12's online marginal-likelihood training (Immer et al. 2021)
        r = p.recipe
        batches = _Batches(
            p.split.x_train, p.split.y_train, r.batch_size, ctx.generator("laplace_marglik-data")
        )
        result = training(
            apply_fn,
            params,
            batches,
            _likelihood(p.kind),
            structure="kron",
            epochs=r.epochs,
            lr=r.lr,
            marglik_frequency=max(1, r.epochs // 8),
            num_data=len(p.split.y_train),
        )
        la, state = result.laplace, result.state
    else:
        params = train(apply_fn, params, p, ctx.generator("laplace_marglik-data"), weight_decay=0.0)
        la, state = _laplace_fit(ctx, apply_fn, params, subset="last_layer", structure="kron")
        state = la.tune(state)
    return _laplace_predictor(p, la, state)


def _swag_state(ctx: Context, apply_fn: Callable, params: dict[str, Tensor], salt: str) -> Any:
    p, r = ctx.problem, ctx.problem.recipe
    batches = _Batches(p.split.x_train, p.split.y_train, r.batch_size, ctx.generator(salt))
    result = swag.fit(
        apply_fn,
        params,
        batches,
        _likelihood(p.kind),
        epochs=r.swag_epochs,
        lr=r.swag_lr,
        momentum=0.9,
        weight_decay=r.weight_decay,
        max_rank=20,
    )
    return result.state


def fit_swag(ctx: Context) -> Predictor:
    apply_fn, params = ctx.map()
    post, q = swag.posterior(_swag_state(ctx, apply_fn, params, "swag-data"))
    samples = post.sample(q, ctx.problem.recipe.num_samples, generator=ctx.draws("swag-draws"))
    return _mc_predictor(ctx.problem, _sampled(apply_fn, samples))


def fit_multiswag(ctx: Context, runs: int = 3) -> Predictor:
    p, r = ctx.problem, ctx.problem.recipe
    net = ctx.fresh_net("multiswag")
    apply_fn, _, _ = funcbnn.functionalize(net)
    members = ensemble.init_members(net, runs, generator=ctx.generator("multiswag-init"))
    members = type(members)(ctx.to_device(members.members))
    maps = ensemble.fit(
        apply_fn,
        members,
        (p.split.x_train, p.split.y_train),
        _likelihood(p.kind),
        epochs=r.epochs,
        batch_size=r.batch_size,
        optimizer=lambda leaves: torch.optim.Adam(leaves, lr=r.lr, weight_decay=r.weight_decay),
        generator=ctx.generator("multiswag-data"),
        method="vmap",
    ).state.members
    states = [
        _swag_state(ctx, apply_fn, optree.tree_map(lambda t: t[i], maps), f"multiswag-swag{i}")
        for i in range(runs)
    ]
    post, q = swag.multiswag(states)
    samples = post.sample(q, r.num_samples, generator=ctx.draws("multiswag-draws"))
    return _mc_predictor(p, _sampled(apply_fn, samples))


METHODS: dict[str, Callable[[Context], Predictor]] = {
    "map": fit_map,
    "mc_dropout": fit_mc_dropout,
    "ensemble": fit_ensemble,
    "bbb": fit_bbb,
    "bbb_map": fit_bbb_map,
    "laplace_kron_ll": fit_laplace_kron_ll,
    "laplace_diag": fit_laplace_diag,
    "laplace_val": fit_laplace_val,
    "laplace_marglik": fit_laplace_marglik,
    "swag": fit_swag,
    "multiswag": fit_multiswag,
}
"""Every method, in the order the tables list them."""


def method_names() -> list[str]:
    """The names of :data:`METHODS`."""
    return list(METHODS)


def is_bayesian(name: str) -> bool:
    """Every method but the MAP."""
    return name != "map"
