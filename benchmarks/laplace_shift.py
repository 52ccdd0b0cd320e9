"""Benchmark (a statistical claim): does online marginal-likelihood training beat post-hoc tuning under shift?

The claim under test (issue 12): on a small-data classification task where the MAP overfits,
``funcbnn.laplace.marglik_training`` (Immer et al. 2021) gives a Laplace predictive that beats both
post-hoc tuning of a Laplace fitted at the MAP and the MAP itself on NLL and ECE under input shift,
with in-distribution NLL no worse than 1.2x the MAP's.

**Task** (generated, one draw per seed): 4 classes, each a mixture of two Gaussian blobs in a 5-d
latent space (centres ``1.6 N(0, I)``, spread 0.9), embedded in 20-d inputs by a random linear map
plus noise 0.3, standardised with the training statistics. Splits drawn independently: **train**
200 examples, **validation** 200 (used only by the validation-tuned method), **test** 2000. The
shifted test sets add Gaussian noise of std ``s`` in {0.5, 1.0, 1.5} to the (standardised) test
inputs ("pixel noise"). No hyperparameter of any method was chosen on the test sets.

**Methods** (MLP 20-100-100-4, ReLU, initialised by the seed; batches of 50):

* ``MAP`` -- Adam (lr 1e-3, weight decay 1e-4: a barely regularised MAP), 300 epochs.
* ``post-hoc marglik`` -- KFAC Laplace (GGN, all weights) at the MAP, one prior precision per
  leaf tuned by the marginal likelihood (``la.tune(state, per_leaf=True)``), GLM probit predictive.
* ``post-hoc val-NLL`` -- the same Laplace, prior precision chosen on the validation split by the
  GLM predictive's NLL (``la.tune(state, method="val_nll", ...)``, 41-point grid 1e-4..1e4).
* ``marglik training`` -- ``marglik_training`` (KFAC, GGN, per-leaf priors, Adam lr 1e-3, 300 epochs,
  a marginal-likelihood step every 5 epochs after 10 epochs of burn-in, 10 hyper steps at lr 0.1),
  its Laplace's GLM probit predictive. ``marglik-trained MAP`` is the same weights without the Laplace.
* ``laplace-torch marglik_training`` -- laplace-torch 0.3's function on the same model, data and
  settings (BackPACK GGN, KFAC with its separate bias blocks), if laplace-torch is installed: an
  independent implementation of the same algorithm, for reference.

**Statistics**: every metric is averaged over ``--seeds`` seeds (each seed a new task draw, split
and initialisation); comparisons are paired by seed and reported as the mean difference with its
standard error and the number of seeds where it holds. A claim "holds" when the mean difference
is in its favour by more than two standard errors; "fails" when it is against it by more than two;
"unclear" otherwise. ECE uses 15 equal-width confidence bins.

Run with ``python benchmarks/laplace_shift.py`` (``--seeds 10`` by default, about a minute per seed
on one core; ``--quick`` runs 2 seeds with fewer epochs, a smoke run that tests nothing).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _load import LoadMeter

import funcbnn
from funcbnn import metrics
from funcbnn.laplace import fit, marglik_training

SHIFTS = (0.5, 1.0, 1.5)
METHODS = (
    "MAP",
    "post-hoc marglik",
    "post-hoc val-NLL",
    "marglik training",
    "marglik-trained MAP",
    "laplace-torch marglik_training",
)
OURS, MAP = "marglik training", "MAP"
RIVALS = ("MAP", "post-hoc marglik", "post-hoc val-NLL")


def make_task(seed: int, d: int = 20, k: int = 4, latent: int = 5, n_train: int = 200, n_val: int = 200,
              n_test: int = 2000) -> dict[str, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    centres = 1.6 * torch.randn(k, 2, latent, generator=g)
    embed = torch.randn(latent, d, generator=g) / math.sqrt(latent)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, k, (n,), generator=g)
        blob = torch.randint(0, 2, (n,), generator=g)
        z = centres[y, blob] + 0.9 * torch.randn(n, latent, generator=g)
        return z @ embed + 0.3 * torch.randn(n, d, generator=g), y

    train, val, test = draw(n_train), draw(n_val), draw(n_test)
    mu, sd = train[0].mean(0), train[0].std(0)
    sets = {name: ((x - mu) / sd, y) for name, (x, y) in (("train", train), ("val", val), ("in-dist", test))}
    x, y = sets["in-dist"]
    for s in SHIFTS:
        sets[f"shift {s:g}"] = (x + s * torch.randn(x.shape, generator=g), y)
    return sets


def mlp(d: int, k: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, k))


def scores(probs: Tensor, y: Tensor) -> tuple[float, float, float]:
    return float(metrics.nll(probs, y)), float(metrics.ece(probs, y)), float(metrics.accuracy(probs, y))


def run_seed(seed: int, epochs: int, with_peer: bool) -> dict[str, dict[str, tuple[float, float, float]]]:
    sets = make_task(seed)
    x_tr, y_tr = sets["train"]
    batches = [(x_tr[i : i + 50], y_tr[i : i + 50]) for i in range(0, x_tr.shape[0], 50)]
    k = int(y_tr.max()) + 1
    torch.manual_seed(seed)
    net = mlp(x_tr.shape[1], k)
    apply_fn, init, _ = funcbnn.functionalize(net)
    eval_sets = [name for name in sets if name not in ("train", "val")]
    out: dict[str, dict[str, tuple[float, float, float]]] = {}

    def record(method: str, predict) -> None:
        with torch.no_grad():
            out[method] = {name: scores(predict(sets[name][0]), sets[name][1]) for name in eval_sets}

    theta = {name: v.clone().requires_grad_(True) for name, v in init.items()}
    opt = torch.optim.Adam(theta.values(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for xb, yb in batches:
            opt.zero_grad()
            F.cross_entropy(apply_fn(theta, xb), yb).backward()
            opt.step()
    map_params = {name: v.detach() for name, v in theta.items()}
    record("MAP", lambda x: apply_fn(map_params, x).softmax(-1))

    la, state = fit(apply_fn, map_params, batches, "classification", structure="kron")
    tuned = la.tune(state, per_leaf=True)
    record("post-hoc marglik", lambda x: la.predict(tuned, x))
    by_val = la.tune(state, method="val_nll", val_data=sets["val"])
    record("post-hoc val-NLL", lambda x: la.predict(by_val, x))

    result = marglik_training(
        apply_fn, init, batches, "classification", structure="kron", epochs=epochs, lr=1e-3,
        marglik_frequency=5, burnin=10, hyper_steps=10, lr_hyp=0.1,
    )
    record("marglik training", lambda x: result.laplace.predict(result.state, x))
    record("marglik-trained MAP", lambda x: apply_fn(result.params, x).softmax(-1))

    if with_peer:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from laplace import marglik_training as peer_training
                from laplace.curvature import BackPackGGN
                from torch.utils.data import DataLoader, TensorDataset

                torch.manual_seed(seed)
                peer_net = mlp(x_tr.shape[1], k)
                loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=50, shuffle=False)
                lap, _, _, _ = peer_training(
                    peer_net, loader, likelihood="classification", hessian_structure="kron", backend=BackPackGGN,
                    optimizer_kwargs={"lr": 1e-3}, n_epochs=epochs, marglik_frequency=5, n_epochs_burnin=10,
                    n_hypersteps=10, lr_hyp=0.1,
                )
                record("laplace-torch marglik_training", lambda x: lap(x, pred_type="glm", link_approx="probit"))
        except ImportError:
            pass
    return out


def paired(results: list[dict], a: str, b: str, split: str, metric: int) -> tuple[float, float, int, int]:
    """Mean and standard error of ``b - a`` (positive: ``a`` is lower, better), and the count where ``a < b``."""
    diffs = torch.tensor([r[b][split][metric] - r[a][split][metric] for r in results if a in r and b in r],
                         dtype=torch.float64)
    n = diffs.numel()
    se = float(diffs.std() / math.sqrt(n)) if n > 1 else float("nan")
    return float(diffs.mean()), se, int((diffs > 0).sum()), n


def verdict(mean: float, se: float) -> str:
    if not math.isfinite(se):
        return "unclear (one seed)"
    if mean > 2 * se:
        return "holds"
    if mean < -2 * se:
        return "FAILS"
    return "unclear"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the models are tiny: 1 is fastest)")
    parser.add_argument("--no-peer", action="store_true", help="skip laplace-torch's marglik_training")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 30 epochs: a smoke run")
    args = parser.parse_args()
    seeds, epochs = (2, 30) if args.quick else (args.seeds, args.epochs)
    torch.set_num_threads(args.threads)
    load = LoadMeter()
    print(f"funcbnn {funcbnn.__version__} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"{seeds} seeds x {epochs} epochs")
    results = []
    for seed in range(seeds):
        start = time.perf_counter()
        results.append(run_seed(seed, epochs, not args.no_peer))
        print(f"  seed {seed}: {time.perf_counter() - start:.1f} s", flush=True)
    splits = list(results[0]["MAP"])
    methods = [m for m in METHODS if all(m in r for r in results)]

    print(f"\nMean over {seeds} seeds (NLL / ECE / accuracy):\n")
    header = f"| {'method':<31} |" + "|".join(f" {s:^23} " for s in splits) + "|"
    print(header)
    print("|" + "-" * 33 + "|" + "|".join("-" * 25 for _ in splits) + "|")
    for m in methods:
        cells = []
        for s in splits:
            vals = torch.tensor([r[m][s] for r in results], dtype=torch.float64).mean(0)
            cells.append(f" {vals[0]:6.3f} / {vals[1]:5.3f} / {vals[2]:5.3f} ")
        print(f"| {m:<31} |" + "|".join(cells) + "|")

    print(f"\nPaired by seed: '{OURS}' against each rival (difference rival - ours, mean +- s.e.; #seeds ours better):\n")
    failed = []
    for s in [x for x in splits if x.startswith("shift")]:
        for metric, name in ((0, "NLL"), (1, "ECE")):
            for rival in RIVALS:
                mean, se, wins, n = paired(results, OURS, rival, s, metric)
                v = verdict(mean, se)
                if v != "holds":
                    failed.append(f"{name} under {s} vs {rival}: {v}")
                print(f"  {s:<10} {name}: vs {rival:<17} {mean:+.3f} +- {se:.3f}  ({wins}/{n})  {v}")
    ratios = torch.tensor([r[OURS]["in-dist"][0] / r[MAP]["in-dist"][0] for r in results], dtype=torch.float64)
    ok = float(ratios.mean()) <= 1.2
    print(f"\n  in-distribution NLL, ours / MAP: mean {ratios.mean():.3f} (max {ratios.max():.3f}; "
          f"{int((ratios <= 1.2).sum())}/{seeds} seeds <= 1.2)  {'holds' if ok else 'FAILS'}")
    if not ok:
        failed.append("in-distribution NLL above 1.2x the MAP's")
    print("\nCLAIM " + ("HOLDS on every comparison." if not failed else "does NOT fully hold:\n  - " + "\n  - ".join(failed)))
    print("\n" + load.footer())


if __name__ == "__main__":
    main()
