"""`result.json`: what a finished round reports, written by the trainer (rank 0) and read by the
worker with the same model (torch-free). Field names are the database's and the API's
(`Job.step`, `Job.round_step`, `Job.total_steps`, `Job.examples`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RestoreRecord(BaseModel):
    """What a round restored, read back from the LIVE optimizer and scheduler right after loading
    (not from the files), so "round k+1 continues round k's optimizer" is checked, not assumed."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    source: str = Field(alias="from")  # the checkpoint directory restored from
    optimizer_state_digest: str  # comparable with checkpoint.optimizer_state_digest of its optimizer.pt
    optimizer_step: int  # Adam's step count
    scheduler_last_epoch: int
    lr_at_start: float | None = None  # once this round's schedule is applied


class RoundResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["ok"] = "ok"
    job_id: str
    final_dir: str
    manifest_sha256: str  # Manifest.sha256 of final/
    step: int  # global optimizer step after the round (carried across rounds)
    examples: int  # global examples after the round
    round_step: int  # optimizer steps of this round
    total_steps: int  # optimizer steps this round was planned for
    eval: dict[str, float] = {}  # metrics on the round's eval split (empty without one)
    eval_before: dict[str, float] = {}  # the same eval set scored by the starting policy (rounds with a gate)
    loss: str
    reference_sha256: str
    reference_param_digest: str | None = None  # the reference's parameters as loaded (None: no reference)
    restored: RestoreRecord | None = None  # None for a round from the SFT model
    resumed: RestoreRecord | None = None  # a retry's resume point
    lora: dict[str, Any] | None = None  # LoRA structure + `merged`, None for full weights
    head: str | None = None  # head kind, None without one

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)
