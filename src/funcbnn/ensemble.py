"""Deep ensembles trained as one vmapped model (Lakshminarayanan et al. 2017).

"Simple and Scalable Predictive Uncertainty Estimation using Deep Ensembles":
``K`` networks from independent initialisations, each trained on its own
random data order, optionally with an adversarial-training term, and
predicting as the uniform mixture of their predictive distributions.

Here the ``K`` members are one parameter tree with a leading member axis
(:class:`~funcbnn.families.empirical.EmpiricalState`), and every optimiser step is one
``vmap``-ed forward and backward over the members, each on its own minibatch.
Because ``torch.optim`` optimisers such as SGD and Adam act element by element,
one optimiser over the stacked leaves is exactly ``K`` independent optimisers:
the result equals training the members one by one with the same generators
(up to float rounding). ``method="loop"`` runs the members one after the other
instead, for forwards that cannot run under ``vmap``.

After training, the members are an empirical posterior: ``sample_outputs(apply_fn,
state.members, x)`` gives ``(K, N, ...)`` outputs and :func:`funcbnn.summarize`
combines them (for a mean-and-variance head, ``"heteroscedastic"``: the mixture's
moment-matched mean and variance, the paper's combination for regression).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from typing import Any, Callable, Literal, NamedTuple

import optree
import torch
from torch import Tensor, nn

from . import distributed
from ._checkpoint import checkpoint_of, generator_state, load_optimizer, resumed_generator, same_layout
from ._validation import positive_int
from .checks import (
    DivergedError,
    check_finite,
    check_generator,
    describe,
    finite_checks_enabled,
    guarded_call,
)
from .families.empirical import EmpiricalState
from .likelihoods import Likelihood, get_likelihood
from .model import functionalize
from .tree import Tree

__all__ = ["EnsembleResult", "init_members", "fit", "disagreement", "pairwise_kl"]


class EnsembleResult(NamedTuple):
    """What :func:`fit` returns: the trained members and each member's loss per step ``(steps, K)``.

    ``checkpoint`` holds what :func:`fit` needs to continue bit-identically
    (``fit(..., resume=result)``): the members, the optimiser's ``state_dict``,
    the generator's state (the members' future data orders), the epochs done,
    the forward path taken and the history; plain tensors, dicts and lists, so
    ``torch.load`` with ``weights_only=True`` reads it.
    """

    state: EmpiricalState
    history: Tensor
    checkpoint: dict | None = None


# A saved result loads with plain torch.load (weights_only=True).
torch.serialization.add_safe_globals([EnsembleResult, EmpiricalState])

_CHECKPOINT_FORMAT = "funcbnn.ensemble.fit"


def _seed_from(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**62, (), generator=generator))


def init_members(module: nn.Module, num_members: int, *, generator: torch.Generator | None = None) -> EmpiricalState:
    """``K`` independent initialisations of ``module``'s own scheme, stacked, from ``generator``.

    Each member is a copy of ``module`` whose layers' ``reset_parameters()``
    ran under a seed drawn from ``generator`` (the global RNG is restored
    afterwards); ``module`` itself is not changed. Parameters of layers without
    ``reset_parameters`` keep ``module``'s values.

    Examples
    --------
    >>> state = init_members(torch.nn.Linear(3, 2), 4, generator=torch.Generator().manual_seed(0))
    >>> state.members["weight"].shape
    torch.Size([4, 2, 3])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    num_members = positive_int(num_members, "num_members")
    members = []
    for _ in range(num_members):
        seed = _seed_from(generator)
        copy_ = copy.deepcopy(module)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in copy_.modules():
                if callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
        members.append(functionalize(copy_).params)
    return EmpiricalState(optree.tree_map(lambda *t: torch.stack(t), *members))


def _check_data(data: Any) -> tuple[Any, Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)):
        raise TypeError("data must be a pair (x, y) of tensors holding the whole training set")
    # detached: data that requires grad would collect every step's gradient in the caller's .grad
    x, y = optree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tuple(data))
    n = y.shape[0] if y.dim() else 0
    tensors = [t for t in optree.tree_leaves(x) if isinstance(t, Tensor)]  # non-tensor leaves pass through
    if not tensors or any(t.dim() == 0 or t.shape[0] != n for t in tensors):
        raise ValueError(
            f"data: every tensor of x needs y's leading number of examples {n}, got x = {describe(x)}"
        )
    if n == 0:
        raise ValueError("data holds no examples")
    return x, y


def _member_loss(apply_fn, lik, adversarial, params, x, y):
    """Mean NLL of one member on its batch, plus the adversarial term of Lakshminarayanan et al."""
    loss = lik.nll(apply_fn(params, x), y).mean()
    if adversarial:
        # fast gradient sign (Goodfellow et al. 2015) at the member's own weights; torch.func.grad
        # (not autograd.grad) so it also runs inside vmap. sign() has zero gradient: x_adv is a constant.
        detached = optree.tree_map(lambda t: t.detach(), params)
        gx = torch.func.grad(lambda xx: lik.nll(apply_fn(detached, xx), y).mean())(x.detach())
        loss = loss + lik.nll(apply_fn(params, x.detach() + adversarial * gx.sign()), y).mean()
    return loss


def fit(
    apply_fn: Callable[..., Any],
    state: EmpiricalState,
    data: tuple[Any, Tensor],
    likelihood: str | Likelihood = "categorical",
    *,
    epochs: int = 10,
    batch_size: int = 128,
    optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
    adversarial_eps: float = 0.0,
    generator: torch.Generator | None = None,
    method: Literal["auto", "vmap", "loop"] = "auto",
    resume: EnsembleResult | dict | None = None,
    progress: bool = False,
    process_group: Any = None,
) -> EnsembleResult:
    """Train every member of ``state`` on ``data``, all at once.

    Parameters
    ----------
    apply_fn : callable
        ``apply_fn(params, x)`` for one member (from :func:`funcbnn.functionalize`).
    state : EmpiricalState
        The members (e.g. from :func:`init_members`); not changed.
    data : (x, y)
        The whole training set as tensors: every member draws its own
        permutation of it each epoch from ``generator``.
    likelihood : str or Likelihood
        The loss is the batch-mean NLL (``"heteroscedastic_regression"`` for
        the paper's mean-and-variance regression members).
    optimizer : callable, optional
        ``optimizer(leaves) -> torch.optim.Optimizer`` over the stacked leaves;
        default ``Adam(lr=1e-3)``. It must act element by element (SGD, Adam,
        AdamW, RMSprop...) for members to stay independent.
    adversarial_eps : float, default 0.0
        ``> 0`` adds the NLL at ``x + eps * sign(grad_x NLL)`` (the paper used
        1% of the input range).
    generator : torch.Generator, optional
        Data orders (one permutation per member per epoch, member by member).
    method : {"auto", "vmap", "loop"}
        One vmapped forward and backward over the members, or a loop of
        per-member ones on the same batches (same numbers up to float rounding;
        the loop also serves forwards vmap cannot run). ``"auto"`` times both on
        the first batch (forward and backward, no optimiser step; the data orders
        are drawn before, so the generator's stream is unchanged, though a forward
        with global-RNG dropout draws from the global RNG) and keeps the faster; a
        forward that fails under vmap loops. A resumed fit keeps the path of the
        run it continues.
    resume : EnsembleResult or dict, optional
        A result of an earlier ``fit`` (or its ``.checkpoint``, also after
        ``torch.save``/``torch.load``): training continues from its members,
        optimiser state, generator state (the data orders), path and history,
        for ``epochs`` more epochs, so ``fit(epochs=2)`` then
        ``fit(epochs=2, resume=...)`` equals ``fit(epochs=4)`` bit for bit
        (same other arguments; ``generator``, a new one if None, is set to the
        saved state). ``state`` must be shaped like the checkpoint's members.
        Not with ``process_group``.
    process_group : torch.distributed group, optional
        Spread the members over the ranks (contiguous blocks, the first ranks one
        more; a rank may have none): each rank trains its members on the whole
        ``data`` with the data orders one process would draw for them, and the
        members are gathered back, so every rank returns what one process
        returns. ``generator`` must be in the same state on every rank.

    Returns
    -------
    EnsembleResult
        ``(state, history, checkpoint)`` with ``history[t, k]`` member ``k``'s loss at step ``t``.

    Raises
    ------
    ValueError
        Inputs the model cannot run on (named, with shape and dtype); targets
        that do not fit the likelihood; NaN or inf in the data
        (:class:`~funcbnn.checks.NonFiniteError`); no examples.
    TypeError
        A ``generator`` that is not a ``torch.Generator``, data that is not a
        pair of tensors.
    funcbnn.checks.DivergedError
        A member's loss became non-finite: ``error.step`` is the step (over the
        whole run), ``error.state`` the members that step started from.

    Examples
    --------
    >>> import funcbnn
    >>> net = torch.nn.Linear(2, 3)
    >>> apply_fn, _, _ = funcbnn.functionalize(net)
    >>> members = init_members(net, 3, generator=torch.Generator().manual_seed(0))
    >>> x, y = torch.randn(64, 2), torch.randint(0, 3, (64,))
    >>> res = fit(apply_fn, members, (x, y), epochs=2, batch_size=32)
    >>> res.history.shape
    torch.Size([4, 3])
    """
    if not isinstance(state, EmpiricalState):
        raise TypeError(f"state must be an EmpiricalState (e.g. from init_members), got {type(state).__name__}")
    generator = check_generator(generator)
    lik = get_likelihood(likelihood)
    x, y = _check_data(data)
    check_finite(x, "data inputs")
    check_finite(y, "data targets")
    ck = checkpoint_of(resume, EnsembleResult, _CHECKPOINT_FORMAT, "ensemble.fit")
    if ck is not None:
        if process_group is not None:
            raise ValueError(
                "resume is not supported with process_group "
                "(each rank holds only its members' optimiser state)"
            )
        if not same_layout(ck["members"], state.members):
            raise ValueError(
                "resume: the checkpoint's members are not shaped like state.members: "
                f"{describe(ck['members'])} vs {describe(state.members)}"
            )
        state = EmpiricalState(ck["members"])
        generator = resumed_generator(ck, generator)
        if method == "auto":
            method = ck["method"]
    epochs = positive_int(epochs, "epochs")
    batch_size = positive_int(batch_size, "batch_size")
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
    eps = float(adversarial_eps)
    if not eps >= 0:
        raise ValueError(f"adversarial_eps must be >= 0, got {adversarial_eps!r}")
    check_finite(state.members, "state.members")
    leaves0 = optree.tree_leaves(state.members)
    if not leaves0 or leaves0[0].dim() == 0:
        raise ValueError("state.members must be a tree of tensors with a leading member axis")
    k = leaves0[0].shape[0]
    if any(t.dim() == 0 or t.shape[0] != k for t in leaves0):
        raise ValueError("state.members: every leaf needs the same leading member axis")
    if callable(getattr(apply_fn, "check_params", None)):
        apply_fn.check_params(state.members, "state.members", leading=1)  # trailing shapes fit the model
    if eps and not (isinstance(x, Tensor) and x.is_floating_point()):
        raise TypeError(
            "adversarial_eps > 0 perturbs the inputs along their gradient: x must be one floating-point "
            "tensor, "
            f"got {type(x).__name__ if not isinstance(x, Tensor) else x.dtype}"
        )
    rank, size = distributed.world(process_group)
    distributed.agree(
        {
            "state.members": distributed.fingerprint(state.members),
            "data": (tuple(y.shape), [tuple(t.shape) if isinstance(t, Tensor) else repr(t) for t in optree.tree_leaves(x)]),
            "epochs, batch_size, adversarial_eps": (epochs, batch_size, eps),
        },
        process_group,
    )
    mine = distributed.shard_range(k, rank, size)  # this rank's members
    k_all, k = k, len(mine)
    members = optree.tree_map(lambda t: t[mine.start : mine.stop].detach().clone().requires_grad_(True), state.members)
    leaves = optree.tree_leaves(members)
    # on the first member of the whole ensemble, so every rank (with members or not) decides alike
    _check_model_and_targets(apply_fn, lik, optree.tree_map(lambda t: t[0].detach(), state.members), x, y)
    opt = optimizer(leaves) if optimizer is not None else torch.optim.Adam(leaves, lr=1e-3)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer must return a torch.optim.Optimizer, got {type(opt).__name__}")
    if ck is not None:
        load_optimizer(opt, ck["optimizer"], "the optimiser")

    n = y.shape[0]
    device = y.device

    # x's tensors are batched per member; its other leaves (an Inputs' flags, scales) are constants,
    # so the batched paths take the tensors as a list and rebuild x around them.
    x_leaves, x_spec = optree.tree_flatten(x)
    x_is_tensor = [isinstance(t, Tensor) for t in x_leaves]

    def rebuild(tensors: list[Tensor]) -> Any:
        it = iter(tensors)
        return optree.tree_unflatten(x_spec, [next(it) if is_t else c for is_t, c in zip(x_is_tensor, x_leaves)])

    def one(params: Tree, xb: list[Tensor], yb: Tensor) -> Tensor:
        return _member_loss(apply_fn, lik, eps, params, rebuild(xb), yb)

    batched = torch.func.vmap(one, in_dims=(0, 0, 0), randomness="different")

    def looped(params: Tree, xb: list[Tensor], yb: Tensor) -> Tensor:
        mleaves, spec = optree.tree_flatten(params)
        return torch.stack([
            one(optree.tree_unflatten(spec, [t[j] for t in mleaves]), [t[j] for t in xb], yb[j])
            for j in range(k)
        ])

    history: list[Tensor] = []
    previous = 0 if ck is None else int(ck["history"].shape[0])
    done = 0 if ck is None else int(ck["epochs"])
    for epoch in range(epochs):
        # every rank draws all K orders (the one-process stream) and keeps its members' rows
        where = generator.device if generator is not None else "cpu"  # the generator's device (CUDA too)
        orders = torch.stack([torch.randperm(n, generator=generator, device=where) for _ in range(k_all)])
        orders = orders[mine.start : mine.stop]
        orders = orders.to(device)  # (K, N)
        for start in range(0, n, batch_size):
            if k == 0:  # a rank without members still walks the steps, to return the same history shape
                history.append(torch.zeros(0))
                continue
            idx = orders[:, start : start + batch_size]  # (K, B): every member its own batch
            xb = [t[idx] for t, is_t in zip(x_leaves, x_is_tensor) if is_t]
            yb = y[idx]
            if method == "auto":
                method = _pick_path(batched, looped, members, xb, yb)
            opt.zero_grad()
            if method == "vmap" and not history:
                losses = _first_vmapped(batched, members, xb, yb)
            else:
                losses = (batched if method == "vmap" else looped)(members, xb, yb)
            # one host sync per step, before the optimiser can write a non-finite update
            # (a finite sum means every loss is finite; only an overflowing sum pays the exact test)
            if (
                finite_checks_enabled()
                and not math.isfinite(losses.detach().sum().item())
                and not bool(torch.isfinite(losses).all())
            ):
                index = previous + len(history)
                bad = [j for j, v in enumerate(losses.tolist()) if not math.isfinite(v)]
                raise DivergedError(
                    f"step {index} (epoch {done + epoch}): the loss of member(s) {bad} became non-finite "
                    f"({losses.tolist()}); the optimiser did not step, error.state holds the members this "
                    "step "
                    "started from. Lower the learning rate or check the data",
                    index,
                    EmpiricalState(optree.tree_map(lambda t: t.detach().clone(), members)),
                )
            losses.sum().backward()  # members do not interact: each gets the gradient of its own loss
            opt.step()
            history.append(losses.detach())
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: member losses {[round(v, 4) for v in history[-1].tolist()]}", file=sys.stderr)
    trained = optree.tree_map(lambda t: t.detach(), members)
    hist = torch.stack(history) if k else torch.zeros(len(history), 0, dtype=leaves0[0].dtype)
    if process_group is not None:
        counts = [len(distributed.shard_range(k_all, r, size)) for r in range(size)]
        trained = distributed.all_gather_blocks(trained, counts, process_group)
        hist = distributed.all_gather_blocks(hist.T.contiguous().to(leaves0[0].dtype), counts, process_group).T
        # no checkpoint: each rank's optimiser holds only its members' share
        return EnsembleResult(EmpiricalState(trained), hist)
    if ck is not None:
        hist = torch.cat([ck["history"], hist])
    checkpoint = {
        "format": _CHECKPOINT_FORMAT,
        "version": 1,
        "members": trained,
        "optimizer": opt.state_dict(),
        **generator_state(generator),
        "epochs": done + epochs,
        "method": method,  # "vmap" or "loop" once a step ran: a resumed "auto" keeps it
        "history": hist,
    }
    return EnsembleResult(EmpiricalState(trained), hist, checkpoint)


def _check_model_and_targets(apply_fn: Callable, lik: Likelihood, member: Tree, x: Any, y: Tensor) -> None:
    """One member on two examples (one would fail a train-mode BatchNorm): inputs the model cannot take
    and targets that do not fit the likelihood fail here, named, instead of inside the vmapped step
    (one small forward, no data pass)."""
    head = min(2, y.shape[0])
    first = optree.tree_map(lambda t: t[:head] if isinstance(t, Tensor) else t, x)
    with torch.no_grad(), guarded_call(x, member, "the data inputs", "ensemble.fit"):
        out = apply_fn(member, first)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model must return one Tensor (what the likelihood scores), got {describe(out)}; wrap it to "
            "return that tensor, e.g. apply_fn=lambda params, x: model_fn(params, x)[0]"
        )
    if out.dim() == 0 or out.shape[0] != head:
        return  # not a batch-first output: the likelihood's own errors will speak
    try:
        lik.check(out[:1].expand(y.shape[0], *out.shape[1:]), y)  # the targets' shape, dtype and range
    except ValueError as e:
        raise ValueError(f"data targets do not fit the likelihood '{lik.name}': {e}") from None


def _first_vmapped(batched: Callable, members: Tree, xb: Any, yb: Tensor) -> Tensor:
    """The first vmapped step; a forward that cannot run under vmap (a train-mode BatchNorm's shared
    running statistics, ``.item()``, data-dependent control flow) gets an error that says what to do."""
    try:
        return batched(members, xb, yb)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"method='vmap': the members' forward cannot run under torch.func.vmap ({first}); pass "
            "method='loop' "
            "(or 'auto', which falls back to the loop), or make the forward vmap-compatible (BatchNorm in "
            "eval "
            "mode: funcbnn.functionalize(module) without train=True)"
        ) from e


def _pick_path(batched: Callable, looped: Callable, members: Tree, xb: Any, yb: Tensor) -> str:
    """``"vmap"`` or ``"loop"``: the faster forward+backward on this batch (best of 3, alternating).

    Gradients go to detached copies, so the timing leaves no trace in the
    members or the optimiser; a forward that fails under vmap gives ``"loop"``.
    """
    copies = optree.tree_map(lambda t: t.detach().requires_grad_(True), members)
    leaves = optree.tree_leaves(copies)

    def run(fn: Callable) -> Callable[[], None]:
        return lambda: torch.autograd.grad(fn(copies, xb, yb).sum(), leaves, allow_unused=True)

    try:
        run(batched)()  # warm-up, and the test whether the forward runs under vmap at all
    except Exception:  # noqa: BLE001 - any failure under vmap means: loop
        return "loop"
    run(looped)()
    best = {"vmap": float("inf"), "loop": float("inf")}
    for _ in range(3):
        for name, fn in (("vmap", batched), ("loop", looped)):
            start = time.perf_counter()
            run(fn)()
            best[name] = min(best[name], time.perf_counter() - start)
    return "vmap" if best["vmap"] <= best["loop"] else "loop"


# --- diversity ----------------------------------------------------------------------------------


def _check_probs(probs: Tensor, name: str) -> Tensor:
    if not isinstance(probs, Tensor) or probs.dim() < 3:
        raise ValueError(f"{name} must be member probabilities (K, N, C), got {getattr(probs, 'shape', type(probs))}")
    if probs.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 members, got {probs.shape[0]}")
    if bool((probs < 0).any()) or bool(((probs.sum(-1) - 1).abs() > 1e-4).any()):
        raise ValueError(f"{name} must be probabilities: non-negative and summing to 1 over the last axis")
    return probs


def disagreement(probs: Tensor) -> Tensor:
    """Mean pairwise disagreement: the fraction of inputs on which two members' top classes differ,
    averaged over all ordered pairs of distinct members (Fort et al. 2019).

    Examples
    --------
    >>> p = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]]])   # 2 members, 1 input
    >>> disagreement(p)
    tensor(1.)
    """
    probs = _check_probs(probs, "probs")
    top = probs.argmax(-1)  # (K, N)
    k = top.shape[0]
    differ = (top[:, None] != top[None]).to(probs.dtype).mean(-1)  # (K, K)
    return differ.sum() / (k * (k - 1))


def pairwise_kl(probs: Tensor) -> Tensor:
    """Mean ``KL(p_i || p_j)`` over ordered pairs of distinct members and over inputs (nats).

    Examples
    --------
    >>> p = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])
    >>> pairwise_kl(p)
    tensor(0.)
    """
    probs = _check_probs(probs, "probs")
    # Probabilities are floored at the dtype's smallest normal number, so disjoint supports give a
    # large finite KL (about 87 nats per class in float32, 708 in float64) rather than inf.
    logp = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    k = probs.shape[0]
    total = probs.new_zeros(())
    for i in range(k):  # one member against all: (K, N) at a time, not a (K, K, N, C) tensor
        total = total + (probs[i] * (logp[i] - logp)).sum(-1).mean(-1).sum()
    return total / (k * (k - 1))
