"""Benchmark: the batched paths on a CUDA device, each against its loop or plain-torch baseline.

Rows, all measured in this process on one device (median of ``--repeats`` timed calls after
warm-up, each call bracketed by ``torch.cuda.synchronize``):

* **predict** -- ``sample_outputs`` of ``S`` diagonal-Gaussian weight samples on a batch of 256:
  ``vmap`` vs ``loop`` vs ``auto`` (the engine's own choice), MLP 784-512-512-10 and a CNN on
  3x32x32 images.
* **VI step** -- one Bayes-by-Backprop step (``vi.step``, Adam) with ``S`` weight draws.
* **ensemble epoch** -- ``ensemble.fit`` for one epoch (8 batches of 128) of ``K`` members, vmap vs
  ``K`` plain ``nn.Module`` copies each with its own Adam.
* **Laplace curvature** -- exact diagonal GGN and KFAC of the CNN over 1024 examples, against one
  forward + ``autograd.grad`` of the summed loss (the cost of a backward pass).

Run with ``python benchmarks/gpu.py`` (``--device cpu --quick`` is a smoke test without a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import optree
import torch
import torch.nn.functional as F
from torch import nn

import funcbnn
from funcbnn import ensemble, vi
from funcbnn.laplace import diag_curvature
from funcbnn.laplace.kron import kron_curvature


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms, synchronising the device around every call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def row(name: str, cells: dict[str, float], base: str) -> None:
    text = "  ".join(f"{k} {v:8.2f} ms" for k, v in cells.items())
    ratios = "  ".join(f"{k}/{base} {v / cells[base]:.2f}x" for k, v in cells.items() if k != base)
    print(f"{name:34s} {text}   {ratios}")


def bench_predict(device: torch.device, repeats: int, samples: int) -> None:
    post = funcbnn.diag_gaussian(init_std=1e-2)
    for name, make, shape in (("MLP 784-512-512-10", mlp, (256, 784)), ("CNN 3x32x32", cnn, (256, 3, 32, 32))):
        apply_fn, params, _ = funcbnn.functionalize(make().to(device))
        draws = post.sample(post.init(params), samples, generator=torch.Generator(device).manual_seed(0))
        x = torch.randn(shape, device=device)
        cells = {m: timed(lambda m=m: funcbnn.sample_outputs(apply_fn, draws, x, method=m), repeats, device)
                 for m in ("loop", "vmap", "auto")}
        row(f"predict {name} S={samples}", cells, "loop")


def bench_vi(device: torch.device, repeats: int, samples: int) -> None:
    post, prior = funcbnn.diag_gaussian(init_std=1e-2), funcbnn.priors.gaussian(1.0)
    apply_fn, params, _ = funcbnn.functionalize(mlp().to(device))
    x, y = torch.randn(256, 784, device=device), torch.randint(0, 10, (256,), device=device)
    cells = {}
    for method in ("loop", "vmap", "auto"):
        state = vi.trainable(post.init(params))
        opt = torch.optim.Adam(vi.leaves(state), lr=1e-3)
        gen = torch.Generator(device).manual_seed(0)

        def one() -> None:
            vi.step(apply_fn, post, prior, state, opt, (x, y), 60000, generator=gen, num_samples=samples,
                    method=method)

        cells[method] = timed(one, repeats, device)
    row(f"VI step MLP 784 S={samples}", cells, "loop")


def bench_ensemble(device: torch.device, repeats: int, members: int) -> None:
    for name, make, d, c in (("MLP 20-64-3", small_mlp, 20, 3), ("MLP 784-512-512-10", mlp, 784, 10)):
        x, y = torch.randn(1024, d, device=device), torch.randint(0, c, (1024,), device=device)
        apply_fn, _, _ = funcbnn.functionalize(make().to(device))
        state = ensemble.init_members(make(), members, generator=torch.Generator().manual_seed(0))
        state = optree.tree_map(lambda t: t.to(device), state)

        def vmapped() -> None:
            ensemble.fit(apply_fn, state, (x, y), epochs=1, batch_size=128, method="vmap",
                         generator=torch.Generator().manual_seed(1))

        nets = [make().to(device) for _ in range(members)]
        opts = [torch.optim.Adam(n.parameters(), lr=1e-3) for n in nets]

        def torch_loop() -> None:
            for net, opt in zip(nets, opts):
                perm = torch.randperm(1024, device=device)
                for i in range(0, 1024, 128):
                    idx = perm[i:i + 128]
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(net(x[idx]), y[idx]).backward()
                    opt.step()

        row(f"ensemble epoch {name} K={members}", {"torch": timed(torch_loop, repeats, device),
                                                    "vmap": timed(vmapped, repeats, device)}, "torch")


def bench_curvature(device: torch.device, repeats: int) -> None:
    net = cnn().to(device)
    apply_fn, params, _ = funcbnn.functionalize(net)
    x, y = torch.randn(1024, 3, 32, 32, device=device), torch.randint(0, 10, (1024,), device=device)
    batches = [(x[i:i + 256], y[i:i + 256]) for i in range(0, 1024, 256)]
    leaves = list(net.parameters())

    def backward() -> None:
        for xb, yb in batches:
            torch.autograd.grad(F.cross_entropy(net(xb), yb, reduction="sum"), leaves)

    cells = {
        "backward": timed(backward, repeats, device),
        "diag_ggn": timed(lambda: diag_curvature(apply_fn, params, batches, "categorical", kind="ggn"), repeats, device),
        "kfac": timed(lambda: kron_curvature(apply_fn, params, batches, "categorical", kind="ggn"), repeats, device),
    }
    row("Laplace curvature CNN N=1024", cells, "backward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 15")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu for a smoke run")
    repeats = 3 if args.quick else 15
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"funcbnn {funcbnn.__version__} | torch {torch.__version__} | {where} | median of {repeats} | "
          f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32 if device.type == 'cuda' else '-'}")
    start = time.perf_counter()
    bench_predict(device, repeats, 64)
    bench_vi(device, repeats, 8)
    bench_ensemble(device, repeats, 10)
    bench_curvature(device, repeats)
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
