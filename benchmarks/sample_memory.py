"""Benchmark: peak memory of ``sample_outputs`` against the size of its outputs.

For each number of weight samples ``S`` the script runs, in a fresh subprocess
per run (so one run's heap cannot hide another's), a 20-64-3 MLP on a batch of
256 inputs under ``torch.no_grad()``:

1. build the model, draw the ``S`` samples and warm up on ``S = 2`` (torch's
   lazy initialisation is not the prediction's memory);
2. read the peak resident set size (``resource.getrusage``'s ``ru_maxrss``),
   call ``sample_outputs`` (default ``method="auto"``: it times both paths on
   this first call), read the peak again.

The table reports the growth of the peak over that call next to the size of
the outputs, and the excess (growth minus outputs), for ``--runs`` identical
runs per ``S``. The promise being checked: the excess is a small constant, not
a multiple of the outputs, and it does not swing between identical runs.

Run with::

    python benchmarks/sample_memory.py                 # S = 2000, 5000, 20000; 3 runs each (~1 min)
    python benchmarks/sample_memory.py --samples 20000 --runs 5 --method loop
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _load import LoadMeter  # a sibling script module: the benchmarks run as scripts from benchmarks/

CHILD = r"""
import json, resource, sys, torch
from torch import nn
import funcbnn
S, method = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 3))
apply_fn, params, _ = funcbnn.functionalize(net)
post = funcbnn.diag_gaussian(init_std=0.05)
state = post.init(params)
x = torch.randn(256, 20)
with torch.no_grad():
    samples = post.sample(state, S, generator=torch.Generator().manual_seed(0))
    funcbnn.sample_outputs(apply_fn, post.sample(state, 2), x, method=method)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = funcbnn.sample_outputs(apply_fn, samples, x, method=method)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before, "out_bytes": out.numel() * out.element_size()}))
"""


def run_once(num_samples: int, method: str) -> dict:
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", CHILD, str(num_samples), method], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[2000, 5000, 20000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--method", default="auto", choices=["auto", "vmap", "loop"])
    args = parser.parse_args()
    meter = LoadMeter()
    print(f"sample_outputs peak RSS growth, 20-64-3 MLP, batch 256, method={args.method}, {args.runs} runs per S")
    print(f"{'S':>7} {'outputs MiB':>12} {'growth MiB (each run)':>32} {'max excess MiB':>15}")
    for num in args.samples:
        rows = [run_once(num, args.method) for _ in range(args.runs)]
        out_mib = rows[0]["out_bytes"] / 2**20
        growth = [r["growth_kib"] / 1024 for r in rows]
        excess = max(g - out_mib for g in growth)
        print(f"{num:>7} {out_mib:>12.1f} {' '.join(f'{g:7.1f}' for g in growth):>32} {excess:>15.1f}")
    print(meter.footer())


if __name__ == "__main__":
    main()
