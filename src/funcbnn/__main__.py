"""``python -m funcbnn``: a short end-to-end run on generated data.

Trains a small MLP on three Gaussian blobs, then puts two posteriors over its
weights: Bayes-by-Backprop VI started from the trained weights (predicting with
64 weight samples in one batched call) and a diagonal GGN Laplace approximation
with a marginal-likelihood prior (linearised predictive). Prints accuracy, NLL
and predictive entropy for in-distribution and far-away (OOD) points.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import funcbnn


def _blobs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.tensor([[0.0, 2.0], [-1.8, -1.0], [1.8, -1.0]])
    y = torch.randint(0, 3, (n,), generator=generator)
    return centres[y] + 0.7 * torch.randn(n, 2, generator=generator), y


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m funcbnn", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="weight samples for prediction")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x_train, y_train = _blobs(600, g)
    x_test, y_test = _blobs(300, g)
    x_ood = 8.0 * torch.randn(300, 2, generator=g) + torch.tensor([12.0, 12.0])

    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    apply_fn, params, _ = funcbnn.functionalize(net)
    params = {k: v.requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(apply_fn(params, x_train), y_train)
        loss.backward()
        opt.step()
    params = {k: v.detach() for k, v in params.items()}
    print(f"1. trained a 2-32-32-3 MLP as a pure function of its weights: train loss {loss.item():.3f}")

    post = funcbnn.diag_gaussian(init_std=0.05)
    prior = funcbnn.priors.gaussian(std=1.0)
    start = time.perf_counter()
    result = funcbnn.vi.fit(
        apply_fn, post, prior, post.init(params), (x_train, y_train),
        epochs=60, batch_size=100, num_samples=4, lr=1e-2, generator=g,
    )
    state = result.state
    print(
        f"2. Bayes-by-Backprop from the trained weights ({funcbnn.tree.tree_size(params)} weights, 4 draws/step, "
        f"{len(result.history.loss)} steps) in {time.perf_counter() - start:.1f} s: "
        f"loss {result.history.loss[0]:.3f} -> {result.history.loss[-1]:.3f}, KL {result.history.kl[-1]:.0f} nats"
    )

    samples = post.sample(state, args.samples, generator=g)
    funcbnn.sample_outputs(apply_fn, samples, x_test)  # first call measures the fastest path
    start = time.perf_counter()
    logits = funcbnn.sample_outputs(apply_fn, samples, x_test)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    funcbnn.sample_outputs(apply_fn, samples, x_test, method="loop")
    looped = time.perf_counter() - start
    print(
        f"3. {args.samples} weight samples x {len(x_test)} inputs in one batched call: "
        f"{batched * 1e3:.1f} ms (loop over samples: {looped * 1e3:.1f} ms)"
    )
    vi_test = funcbnn.summarize(logits, "classification").probs
    vi_ood = funcbnn.summarize(funcbnn.sample_outputs(apply_fn, samples, x_ood), "classification").probs

    start = time.perf_counter()
    la, la_state = funcbnn.laplace.fit(apply_fn, params, [(x_train, y_train)], "categorical")
    la_state = la.tune(la_state)
    print(
        f"4. diagonal GGN Laplace at the trained weights, prior precision tuned by marginal likelihood "
        f"to {la_state.prior_precision.item():.2f}, in {time.perf_counter() - start:.2f} s"
    )
    la_test, la_ood = la.predict(la_state, x_test), la.predict(la_state, x_ood)
    with torch.no_grad():
        map_test, map_ood = apply_fn(params, x_test).softmax(-1), apply_fn(params, x_ood).softmax(-1)

    print("5. method            test acc  test NLL   entropy in-dist   entropy far away (OOD)")
    for name, p_test, p_ood in (
        ("MAP", map_test, map_ood),
        ("VI (BBB)", vi_test, vi_ood),
        ("Laplace (GLM)", la_test, la_ood),
    ):
        acc = (p_test.argmax(-1) == y_test).float().mean().item()
        nll = -p_test.gather(1, y_test[:, None]).clamp_min(1e-12).log().mean().item()
        print(f"   {name:16s} {acc:9.3f} {nll:9.3f} {_entropy(p_test):17.3f} {_entropy(p_ood):24.3f}")


def _entropy(probs: torch.Tensor) -> float:
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean().item()


if __name__ == "__main__":
    main()
