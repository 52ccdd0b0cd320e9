"""``python -m funcbnn``: a short end-to-end run on generated data.

Trains a small MLP on three Gaussian blobs, puts a pretrained-centred diagonal
Gaussian over its weights, predicts with 64 weight samples in one batched call
and prints accuracy, NLL and the uncertainty split for in-distribution points
and for far-away (out-of-distribution) points.
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

    post = funcbnn.diag_gaussian(init_std=0.15)
    state = post.init(params)
    prior = funcbnn.priors.gaussian(std=1.0)
    print(
        f"2. diagonal Gaussian centred on the trained weights "
        f"({funcbnn.tree.tree_size(params)} weights), KL to N(0, 1): {post.kl(state, prior).item():.1f} nats"
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

    test = funcbnn.summarize(logits, "classification")
    ood = funcbnn.summarize(funcbnn.sample_outputs(apply_fn, samples, x_ood), "classification")
    acc = (test.probs.argmax(-1) == y_test).float().mean().item()
    nll = -test.probs.gather(1, y_test[:, None]).clamp_min(1e-12).log().mean().item()
    print(f"4. test accuracy {acc:.3f}, NLL {nll:.3f}")
    print("   mean uncertainty (nats)      entropy  aleatoric  epistemic (MI)")
    for name, s in (("in-distribution", test), ("far away (OOD)", ood)):
        print(
            f"   {name:28s} {s.entropy.mean().item():8.3f} {s.expected_entropy.mean().item():10.3f}"
            f" {s.mutual_info.mean().item():15.3f}"
        )


if __name__ == "__main__":
    main()
