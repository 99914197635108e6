"""Helpers shared by the benchmark scripts: timing side by side, and a judge of digits."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import diffkit


def alternate(contenders: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Run each contender once per round, in alternating order, and return the median
    seconds of each: machine noise then hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


class DigitsJudge:
    """A classifier trained on real digits (scikit-learn's SVC on the 8×8 pixels),
    independent of every model it judges. Held-out accuracy is reported beside any use."""

    def __init__(self, seed: int = 0) -> None:
        from sklearn.svm import SVC

        registry = diffkit.get_registry()
        train = registry.build("data", {"type": "digits", "split": "train"})
        test = registry.build("data", {"type": "digits", "split": "test"})
        xtr, ytr = train.tensors()
        xte, yte = test.tensors()
        self.model = SVC(C=10.0, gamma="scale", probability=True, random_state=seed)
        self.model.fit(self._features(xtr), ytr.numpy())
        proba = self.model.predict_proba(self._features(xte))
        self.test_accuracy = float((proba.argmax(1) == yte.numpy()).mean())
        self.test_confident = float((proba.max(1) >= 0.8).mean())

    @staticmethod
    def _features(x: torch.Tensor) -> np.ndarray:
        return x.reshape(x.shape[0], -1).clamp(-1, 1).double().numpy()

    def proba(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities ``[N, 10]`` of images ``[N, 1, 8, 8]`` in [−1, 1]."""
        return self.model.predict_proba(self._features(images))

    def report(self, images: torch.Tensor, threshold: float = 0.8) -> dict[str, object]:
        p = self.proba(images)
        confident = p.max(1) >= threshold
        counts = np.bincount(p.argmax(1)[confident], minlength=10)
        return {
            "confident_fraction": float(confident.mean()),
            "counts": counts.tolist(),
            "digits_present": int((counts > 0).sum()),
        }
