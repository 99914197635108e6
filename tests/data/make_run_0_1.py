import torch, numpy as np, sys
from pathlib import Path
from diffkit import Pipeline
out = Path(sys.argv[1])
spec = {"seed": 3, "data": {"type": "moons", "n": 2000, "noise": 0.05},
        "schedule": {"type": "linear", "timesteps": 100}, "denoiser": {"type": "mlp", "hidden": 32, "depth": 2},
        "objective": {"type": "epsilon"}, "sampler": {"type": "ddpm"}, "train": {"steps": 200, "batch_size": 256}}
p = Pipeline.from_spec(spec)
p.fit(progress=False)
p.save(out / "run-0.1")
res = {}
for name, s in {"ddpm": {"type": "ddpm"}, "ddim": {"type": "ddim", "steps": 10}, "dpm-solver": {"type": "dpm-solver", "steps": 10}, "ddim-eta1": {"type": "ddim", "steps": 20, "eta": 1.0}}.items():
    res[name] = p.sample(16, seed=7, sampler=s).numpy()
np.savez(out / "samples-0.1.npz", **res)
print({k: v[:2] for k, v in res.items()})
