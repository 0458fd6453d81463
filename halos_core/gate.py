"""A round's promotion gate (torch-free): which eval metrics may not get worse than the head's.

The round's eval set is scored twice by the trainer with the round's loss: by the policy it starts
from (the run's head) before the first step (`RoundResult.eval_before`), and by the trained policy
after the last (`RoundResult.eval`). Each rule compares one metric:

    higher_is_better:  after >= before - max_drop      (e.g. rewards/accuracy, rewards/margin)
    lower is better:   after <= before + max_drop      (e.g. loss)

A round whose gate fails still finishes `succeeded` (its checkpoint exists and can be rolled back
to), but it is not promoted: the run's head stays where it was and the verdict is recorded.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class GateRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str = Field(
        "rewards/accuracy",
        min_length=1,
        max_length=100,
        description="an eval metric of the round's loss, e.g. rewards/accuracy, rewards/margin, loss",
    )
    max_drop: float = Field(0.0, ge=0, description="how much worse than the head's value it may be")
    higher_is_better: bool = True


def verdict(rules: list[GateRule], before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """{"passed": bool, "checks": [{metric, head, round, allowed, passed}], "reason": str | None}."""
    checks = []
    failed = []
    for rule in rules:
        head, new = before.get(rule.metric), after.get(rule.metric)
        if head is None or new is None:
            ok, allowed = False, None
            failed.append(f"{rule.metric} was not measured (eval metrics: {', '.join(sorted(after)) or 'none'})")
        else:
            allowed = head - rule.max_drop if rule.higher_is_better else head + rule.max_drop
            ok = new >= allowed if rule.higher_is_better else new <= allowed
            if not ok:
                failed.append(
                    f"{rule.metric} {new:.4g} vs the head's {head:.4g} (allowed "
                    f"{'>=' if rule.higher_is_better else '<='} {allowed:.4g})"
                )
        checks.append({"metric": rule.metric, "head": head, "round": new, "allowed": allowed, "passed": ok})
    return {"passed": not failed, "checks": checks, "reason": "; ".join(failed) or None}
