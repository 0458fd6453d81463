"""Per-step metric accumulation (summed across microbatches and processes).

Loss units return detached `values`: per-example vectors ("losses", "chosen_rewards", ...) and
scalars ("kl", ...). A `MetricAccumulator` keeps (sum, count) per name: a vector adds its sum and
its number of elements, a scalar (0-d or one element) adds itself with count 1 (a mean over
microbatches). `reduce` sums the pairs over processes with one collective and returns means.

Names in the metrics lines follow the run-directory contract:
    chosen_rewards -> rewards/chosen, rejected_rewards -> rewards/rejected,
    margins -> rewards/margin, accuracies/accuracy -> rewards/accuracy, ties -> rewards/ties; other names
    unchanged.
Token-level values ([B, T] tensors) are skipped. `rewards/margin` is derived as mean(chosen) - mean(rejected)
when the loss reports no margins
(KTO: desirable and undesirable rows are different examples).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

RENAME = {
    "chosen_rewards": "rewards/chosen",
    "rejected_rewards": "rewards/rejected",
    "margins": "rewards/margin",
    "accuracies": "rewards/accuracy",
    "accuracy": "rewards/accuracy",
    "ties": "rewards/ties",
}
SKIP = {"losses", "loss", "tokens"}  # the scalar loss is recorded separately; token counts are not a metric


class MetricAccumulator:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, total: float, count: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(total)
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def add_values(self, values: dict[str, torch.Tensor], per_example: int, weight: float = 1.0) -> None:
        """Add a loss's values; `per_example` is the microbatch size (vectors of that length are per example).
        `weight` 0: a padding microbatch (it registers the names, contributes nothing)."""
        for key, value in values.items():
            if key in SKIP:
                continue
            if value.ndim >= 2:  # token-level diagnostics ([B, T]: PPO's advantages) are not step metrics
                continue
            name = RENAME.get(key, key)
            v = value.detach().float().reshape(-1)
            if v.numel() == 1 and per_example != 1 and key not in RENAME:
                self.add(name, weight * v.item(), weight)
            else:
                self.add(name, weight * v.sum().item(), weight * v.numel())

    def reduce(
        self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None, names: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Means over processes. With `all_reduce_sum` every process must pass the same `names`
        (default: the names added here, which must then be the same on every process): the
        collective always runs, a name not added here contributes (0, 0)."""
        names = sorted(self.sums) if names is None else sorted(names)
        if not names and all_reduce_sum is None:
            return {}
        packed = torch.tensor(
            [[self.sums.get(n, 0.0), self.counts.get(n, 0.0)] for n in names], dtype=torch.float64
        ).reshape(len(names), 2)
        if all_reduce_sum is not None:
            packed = all_reduce_sum(packed)
        out: dict[str, float] = {}
        for n, (s, c) in zip(names, packed.tolist()):
            if c > 0:
                out[n] = s / c
        if "rewards/margin" not in out and "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out
