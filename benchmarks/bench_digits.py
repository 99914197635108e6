"""Digits: sample quality judged by an independent classifier, and U-Net speed on CPU.

    python benchmarks/bench_digits.py                 # train examples/digits.yaml, then judge
    python benchmarks/bench_digits.py --run runs/digits   # judge an existing run
    python benchmarks/bench_digits.py --quick         # a smoke run of every section

1. Quality: an SVC trained on the real training digits (its held-out accuracy is
   printed) classifies 500 samples (``--n``); goal: ≥ 80 % classified with confidence ≥ 0.8 and
   all 10 digits present.
2. Speed: U-Net training steps/s and sampling ms/step at 8×8 (batch 128) and 28×28
   (batch 32): the full loop (Pipeline.fit / Pipeline.sample) beside the network
   alone (forward+backward+AdamW step; forward only), timed alternately, medians.
3. CPU options (``--options``): the network's training step and sampling forward in
   eager mode (one thread) against channels-last memory, ``torch.compile`` and two
   threads, alternated in one process; ratios of medians to eager.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffkit  # noqa: E402
from common import DigitsJudge, alternate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def quality(args: argparse.Namespace) -> dict[str, object]:
    judge = DigitsJudge()
    print(
        f"judge: SVC on real digits, held-out accuracy {judge.test_accuracy:.1%}, "
        f"real held-out digits with confidence ≥ 0.8: {judge.test_confident:.1%}"
    )
    if args.run:
        pipe = diffkit.Pipeline.load(args.run)
        train_s = None
    else:
        pipe = diffkit.Pipeline.from_spec(ROOT / "examples" / "digits.yaml")
        start = time.perf_counter()
        steps = 50 if args.quick else None
        pipe.fit(progress=not args.quick, **({"steps": steps} if steps else {}))
        train_s = time.perf_counter() - start
        print(f"trained {pipe.steps_trained} steps in {train_s:.0f} s")
    n = 50 if args.quick else args.n
    start = time.perf_counter()
    samples = pipe.sample(n, seed=1, batch_size=250, progress=not args.quick, steps=20 if args.quick else None)
    sample_s = time.perf_counter() - start
    report = judge.report(samples)
    print(
        f"samples: {n} in {sample_s:.0f} s; confident (≥ 0.8): {report['confident_fraction']:.1%} (goal ≥ 80%); "
        f"digits present: {report['digits_present']}/10 (goal 10); counts {report['counts']}"
    )
    return {"train_s": train_s, "sample_s": sample_s, "judge_accuracy": judge.test_accuracy, **report}


def speed(size: int, batch: int, rounds: int, steps: int) -> dict[str, float]:
    data = {"type": "digits"} if size == 8 else {"type": "digits", "size": size}
    pipe = diffkit.Pipeline(
        denoiser="unet",
        data=data,
        train={"batch_size": batch, "log_every": 10_000, "preview": 0, "device": "cpu"},
    )
    net = copy.deepcopy(pipe.denoiser).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, *pipe.context.sample_shape)
    t = torch.randint(0, pipe.schedule.T, (batch,))

    def net_train() -> None:
        for _ in range(steps):
            loss = (net(x, t) - x).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def full_train() -> None:
        pipe.fit(steps=steps, progress=False)

    eval_net = copy.deepcopy(pipe.denoiser).eval()

    def net_sample() -> None:
        with torch.inference_mode():
            y = x
            for k in range(steps):
                y = eval_net(y, torch.full((batch,), pipe.schedule.T - 1 - k))

    def full_sample() -> None:
        pipe.sample(batch, seed=0, steps=steps)

    full_train()  # warm-up: first-call allocations
    tr = alternate({"network": net_train, "pipeline": full_train}, rounds)
    sa = alternate({"network": net_sample, "pipeline": full_sample}, rounds)
    return {
        "train_steps_per_s": steps / tr["pipeline"],
        "train_network_steps_per_s": steps / tr["network"],
        "sample_ms_per_step": 1e3 * sa["pipeline"] / steps,
        "sample_network_ms_per_step": 1e3 * sa["network"] / steps,
    }


def options(size: int, batch: int, rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """Seconds per training step and per sampling forward of the default U-Net under each
    CPU option, alternated round by round, medians; every contender runs the same weights."""
    data = {"type": "digits"} if size == 8 else {"type": "digits", "size": size}
    pipe = diffkit.Pipeline(denoiser="unet", data=data, train={"batch_size": batch, "preview": 0, "device": "cpu"})
    x = torch.randn(batch, *pipe.context.sample_shape)
    t = torch.randint(0, pipe.schedule.T, (batch,))

    def variant(channels_last: bool = False, compiled: bool = False, threads: int = 1):
        net = copy.deepcopy(pipe.denoiser)
        xs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        # One compiled graph per mode, shapes fixed: training and eval graphs differ.
        train_fn = torch.compile(net, dynamic=False) if compiled else net
        eval_fn = torch.compile(net, dynamic=False) if compiled else net
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def train() -> None:
            torch.set_num_threads(threads)
            net.train()
            for _ in range(steps):
                loss = (train_fn(xs, t) - xs).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        def sample() -> None:
            torch.set_num_threads(threads)
            net.eval()
            with torch.no_grad():
                for _ in range(steps):
                    eval_fn(xs, t)

        train(), sample()  # warm-up (and compilation)
        return train, sample

    made = {
        "eager": variant(),
        "channels-last": variant(channels_last=True),
        "compile": variant(compiled=True),
        "2 threads": variant(threads=2),
    }
    out = {}
    for what, index in (("train", 0), ("sample", 1)):
        times = alternate({name: fns[index] for name, fns in made.items()}, rounds)
        out[what] = {name: seconds / steps for name, seconds in times.items()}
    torch.set_num_threads(1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="judge this run directory instead of training examples/digits.yaml")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every section")
    parser.add_argument("--n", type=int, default=500, help="samples judged (default 500; ±1.6 %% at 85 %%)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--options", action="store_true", help="also time channels-last, torch.compile and 2 threads")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_quality:
        quality(args)
    if not args.skip_speed:
        rounds, steps = (2, 2) if args.quick else (5, 10)
        print("\nU-Net speed (default unet), medians of alternated rounds")
        print(f"{'input':>8} {'batch':>5} {'train steps/s':>14} {'net only':>9} {'share':>6} {'sample ms/step':>15} {'net only':>9} {'share':>6}")
        for size, batch in ((8, 128), (28, 32)):
            r = speed(size, batch, rounds, steps)
            tshare = 1 - r["train_steps_per_s"] / r["train_network_steps_per_s"]
            sshare = 1 - r["sample_network_ms_per_step"] / r["sample_ms_per_step"]
            print(
                f"{size:>5}×{size:<2} {batch:>5} {r['train_steps_per_s']:>14.2f} {r['train_network_steps_per_s']:>9.2f} {tshare:>6.0%}"
                f" {r['sample_ms_per_step']:>15.1f} {r['sample_network_ms_per_step']:>9.1f} {sshare:>6.0%}"
            )
    if args.options:
        rounds, steps = (2, 2) if args.quick else (7, 5)
        print("\nCPU options, the network alone: ms per training step / per sampling forward, ratio to eager")
        for size, batch in ((8, 128), (28, 32)):
            r = options(size, batch, rounds, steps)
            for what, row in r.items():
                cells = "  ".join(f"{name} {1e3 * sec:7.1f} ({row['eager'] / sec:4.2f}×)" for name, sec in row.items())
                print(f"{size:>5}×{size:<2} {batch:>4} {what:<6} {cells}", flush=True)


if __name__ == "__main__":
    main()
