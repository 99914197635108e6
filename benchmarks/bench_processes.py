#!/usr/bin/env python3
"""Two moons across processes: each moons example spec trained as written (3,000 steps),
sampled with its own sampler and others, sliced Wasserstein-2 to independent moons draws.

    python benchmarks/bench_processes.py        # about 5 minutes on 2 CPU cores

Prints SW2 and its ratio to the noise floor (independent draws against the same
reference); divide two rows for the ratio to 1000-step DDPM of the ε-model, which is the
first row. 5,000 samples × 2 seeds: a quick measure, not bench_steps.py's 20,000 paired.
"""
import json
import time

import torch
import numpy as np
from sklearn.datasets import make_moons
from diffkit import Pipeline
N = 5000
def sw(a, b, n=256):
    g = torch.Generator().manual_seed(0); th = torch.randn(n, 2, generator=g); th /= th.norm(dim=1, keepdim=True)
    pa = (a @ th.T).sort(0).values; pb = (b @ th.T).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())
ref = torch.tensor(make_moons(N, noise=0.05, random_state=101)[0], dtype=torch.float32)
floor = np.mean([sw(torch.tensor(make_moons(N, noise=0.05, random_state=200 + i)[0], dtype=torch.float32), ref) for i in range(3)])
print(f"floor {floor:.4f}", flush=True)
rows = []
for spec, samplers in [("examples/moons.yaml", [None, {"type": "ddim", "steps": 20}]),
                       ("examples/moons-edm.yaml", [None, {"type": "euler", "steps": 35}, {"type": "dpm-solver", "steps": 20}]),
                       ("examples/moons-rectified-flow.yaml", [None, {"type": "heun", "steps": 18}]),
                       ("examples/moons-ncsn.yaml", [None, {"type": "pc", "steps": 200}])]:
    p = Pipeline.from_spec(spec)
    t = time.time(); p.fit(progress=False); tt = time.time() - t
    for s in samplers:
        xs = [p.sample(N, seed=k, sampler=s) for k in range(2)]
        d = np.mean([sw(x, ref) for x in xs])
        name = p.sampler.name if s is None and hasattr(p.sampler, "name") else (s or {}).get("type", type(p.sampler).__name__)
        print(f"{spec:38s} {json.dumps(s):45s} sw {d:.4f} ratio {d/floor:.2f} (train {tt:.0f}s)", flush=True)
