"""The training loop of one round: optimizer steps over the loader, metrics, checkpoints, eval.

`Trainer` composes what `halos_core.training.build` prepared: the policy (wrapped so forward
returns token log-probs), the `ForwardPass` (policy + reference log-probs), the loss unit, the
train/eval loaders, optimizer and scheduler. It knows nothing of particular losses: each loss
builds its own inputs from the forward pass (`loss.inputs`) and computes itself.

LR schedule: linear warmup over `warmup_steps` then constant, a LambdaLR keyed on the GLOBAL
optimizer step (carried across rounds), so later rounds do not warm up again.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from halos_core.checkpoint import DEFAULT_KEEP_LAST, prune_checkpoints, restore_rng
from halos_core.config import lora_structure
from halos_core.data.collate import Microbatch
from halos_core.data.loaders import EvalLoader, TrainLoader
from halos_core.job_spec import RunConfig
from halos_core.losses import Loss, LossOutput
from halos_core.metrics import MetricAccumulator
from halos_core.round_result import RestoreRecord, RoundResult
from halos_core.run_dir import Manifest, RunDir, write_json_atomic
from halos_core.sharded import is_fsdp, to_plain
from halos_core.training import saving
from halos_core.training.alive import PhaseProgress
from halos_core.training.forward import ForwardPass

log = logging.getLogger("halos_core.training")


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier for global step s (0-based): linear warmup over `warmup_steps`, then 1."""

    def factor(step: int) -> float:
        if warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / warmup_steps)

    return factor


class Stopped(Exception):
    """Raised by `Trainer.train(stop_after=...)` (tests: simulate a kill after a step)."""


@dataclass
class RoundPosition:
    """Where the round starts: global counters at round start and the round-local position."""

    step_offset: int  # global step before this round's first step
    examples_offset: int  # cumulative examples before this round
    round_step: int  # optimizer steps already done in this round (resume)


class Trainer:
    def __init__(
        self,
        *,
        config: RunConfig,
        accelerator: Any,
        model: torch.nn.Module,  # prepared TokenLogprobModel
        forward: ForwardPass,
        tokenizer: Any,
        loss: Loss[Any],
        train_loader: TrainLoader,
        eval_loader: EvalLoader | None,
        optimizer: Any,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        position: RoundPosition,
        reference_sha256: str,
        rng_state: dict[str, Any] | None = None,
        keep_last: int = DEFAULT_KEEP_LAST,
        restored: RestoreRecord | None = None,
        resumed: RestoreRecord | None = None,
        reference_param_digest: str | None = None,
        optimizer_params: list[str] | None = None,
    ):
        self.config = config
        self.hp = config.hyperparams
        self.accelerator = accelerator
        self.model = model
        self.forward = forward
        self.tokenizer = tokenizer
        self.loss = loss
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.position = position
        self.reference_sha256 = reference_sha256
        self.rng_state = rng_state
        self.keep_last = keep_last
        self.run_dir = RunDir(config.run_dir)
        self.round_step = position.round_step
        # proofs recorded in result.json (see halos_core.round_result.RestoreRecord)
        self.restored = restored
        self.resumed = resumed
        self.reference_param_digest = reference_param_digest
        self.optimizer_params = optimizer_params
        self.lora = config.lora
        self.sharded = is_fsdp(accelerator)  # FSDP2: parameters and optimizer state are sharded

    @classmethod
    def from_config(cls, config: RunConfig, *, accelerator: Any = None, keep_last: int = DEFAULT_KEEP_LAST) -> Trainer:
        from halos_core.training.build import build_trainer

        return build_trainer(config, accelerator=accelerator, keep_last=keep_last)

    @property
    def reference(self) -> torch.nn.Module | None:
        return self.forward.reference

    # ------------------------------------------------------------------ one microbatch
    def compute_loss(self, mb: Microbatch, train: bool = True) -> LossOutput:
        return self.loss.compute(**self.loss.inputs(self.forward, mb, train))

    def precompute_reference(self) -> None:
        """Fill the reference cache for the rest of the round and the eval set (no-op for losses
        without a reference)."""
        if not self.loss.needs_reference:
            return
        loader = self.train_loader
        train = (mb for step in range(self.round_step, loader.total_steps) for mb in loader.microbatches(step))
        evals = (mb for mb, _ in self.eval_loader.padded()) if self.eval_loader is not None else ()
        self.forward.precompute_reference(itertools.chain(train, evals), self._cache_tag())

    def _cache_tag(self) -> str:
        return f"{self.config.job_id}-rank{self.accelerator.process_index}"

    @property
    def _reference_per_batch(self) -> bool:
        """The reference rows are computed as batches come (CPU) and kept in this process until
        flushed, rather than all up front (`Forward.reference_up_front`)."""
        return self.loss.needs_reference and not self.forward.reference_up_front

    # ------------------------------------------------------------------ state
    def global_step(self) -> int:
        return self.position.step_offset + self.round_step

    def round_examples(self) -> int:
        return self.round_step * self.hp.batch_size

    def global_examples(self) -> int:
        return self.position.examples_offset + self.round_examples()

    def head(self) -> torch.nn.Module | None:
        return self.accelerator.unwrap_model(self.model).head

    def save(self, target: Path, kind: str) -> Manifest:
        return saving.save(self, target, kind)

    # ------------------------------------------------------------------ loop
    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return t
        return self.accelerator.reduce(t.to(self.accelerator.device), reduction="sum").cpu()

    def _metric_names(self, local: dict[str, Any]) -> list[str]:
        """The union of every process's metric names (a collective): one rank-independent list."""
        if self.accelerator.num_processes == 1:
            return sorted(local)
        gathered: list[Any] = [None] * self.accelerator.num_processes
        torch.distributed.all_gather_object(gathered, sorted(local))
        return sorted(set().union(*gathered))

    def train(self, stop_after: int | None = None) -> RoundResult | None:
        """Run the round to the end (or raise `Stopped` after round step `stop_after`). Returns the
        result written to result.json (None on processes other than the main one)."""
        acc, hp, loader = self.accelerator, self.hp, self.train_loader
        if self.forward.reference_up_front:
            self.precompute_reference()
        eval_before = self.baseline_eval()
        if self.rng_state is not None:
            restore_rng(self.rng_state)
        total = loader.total_steps
        every = hp.checkpoint_every
        self.model.train()
        for step in range(self.round_step, total):
            t0 = time.perf_counter()
            metrics = MetricAccumulator()
            lr = self.scheduler.get_last_lr()[0]
            tokens = 0
            grad_norm = None
            microbatches = loader.microbatches(step)
            for k, mb in enumerate(microbatches):
                mb = mb.to(acc.device)
                tokens += mb.n_tokens
                with acc.accumulate(self.model):
                    out = self.compute_loss(mb, train=True)
                    acc.backward(out.loss)
                    if k == len(microbatches) - 1:
                        if not acc.sync_gradients:
                            raise RuntimeError("gradient accumulation is out of step with the loader")
                        grad_norm = to_plain(acc.clip_grad_norm_(self.model.parameters(), hp.max_grad_norm))
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                metrics.add("loss", out.loss.detach().float().item(), 1)
                metrics.add_values(out.values, mb.size)
            self.scheduler.step()
            self.round_step = step + 1
            reduced = metrics.reduce(self._reduce_sum)
            tok_total = self._reduce_sum(torch.tensor([float(tokens)], dtype=torch.float64)).item()
            elapsed = time.perf_counter() - t0
            if acc.is_main_process:
                record = {
                    "step": self.global_step(),
                    "round_step": self.round_step,
                    "total_steps": total,
                    "examples": self.global_examples(),
                    "epoch": self.round_step / loader.steps_per_epoch,
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens": int(tok_total),
                    "tokens_per_s": tok_total / elapsed if elapsed > 0 else None,
                    "time": time.time(),
                    **reduced,
                }
                if not math.isfinite(record["loss"]):
                    log.warning("non-finite loss at step %s", record["step"])
                self.run_dir.append_metrics(record)
            if every and self.round_step % every == 0 and self.round_step < total:
                path = self.run_dir.checkpoint_path(self.global_step())
                if self._reference_per_batch:
                    # the reference rows computed so far go with the checkpoint: a sequence seen
                    # before it and again after is then served to a retry as to this attempt (a
                    # row's log-probs depend, in their last bits, on the batch that computed it)
                    self.forward.flush_reference(f"{self._cache_tag()}-step{self.global_step():06d}")
                self.save(path, "intermediate")
                if acc.is_main_process:
                    self.run_dir.log_checkpoint(self.global_step(), path.name)
                    prune_checkpoints(self.run_dir, self.keep_last)
                acc.wait_for_everyone()
            if stop_after is not None and self.round_step >= stop_after and self.round_step < total:
                raise Stopped(f"stopped after round step {self.round_step}")

        eval_metrics = self.evaluate() if self.eval_loader is not None else {}
        if eval_metrics and acc.is_main_process:
            self.run_dir.append_metrics(
                {
                    "split": "eval",
                    "step": self.global_step(),
                    "round_step": self.round_step,
                    "total_steps": total,
                    "examples": self.global_examples(),
                    "time": time.time(),
                    **eval_metrics,
                }
            )
        if self._reference_per_batch:
            # the rows computed batch by batch (train and eval) for later rounds
            self.forward.flush_reference(self._cache_tag())
        manifest = self.save(self.run_dir.final, "final")
        result = None
        if acc.is_main_process:
            head = self.head()
            result = RoundResult(
                job_id=self.config.job_id,
                final_dir=str(self.run_dir.final.resolve()),
                manifest_sha256=manifest.sha256,
                step=self.global_step(),
                examples=self.global_examples(),
                round_step=self.round_step,
                total_steps=total,
                eval=eval_metrics,
                eval_before=eval_before,
                loss=self.loss.name,
                reference_sha256=self.reference_sha256,
                reference_param_digest=self.reference_param_digest,
                restored=self.restored,
                resumed=self.resumed,
                lora=lora_structure(self.lora) | {"merged": self.lora.merge_on_export}
                if self.lora is not None
                else None,
                head=head.kind if head is not None else None,
            )
            self.run_dir.write_result(result)
        acc.wait_for_everyone()
        return result

    def baseline_eval(self) -> dict[str, float]:
        """A round with a promotion gate scores its eval set with the policy it starts from (the
        run's head) before its first step. Kept in eval_before.json, so a retry that resumes
        mid-round reports the same baseline instead of scoring a half-trained policy."""
        if not self.config.gate or self.eval_loader is None:
            return {}
        path = self.run_dir.path / "eval_before.json"
        if self.round_step > 0:
            return {k: float(v) for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}
        before = self.evaluate()
        if self.accelerator.is_main_process:
            write_json_atomic(path, before)
        self.accelerator.wait_for_everyone()
        return before

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        assert self.eval_loader is not None
        inner = self.accelerator.unwrap_model(self.model)
        was_training = inner.training
        inner.eval()
        metrics = MetricAccumulator()
        try:
            # the same number of forwards on every process (FSDP forwards are collectives); a
            # process with fewer eval examples runs padding microbatches of weight 0
            progress = PhaseProgress("evaluation")
            for mb, weight in self.eval_loader.padded():
                mb = mb.to(self.accelerator.device)
                out = self.compute_loss(mb, train=False)
                metrics.add("loss", weight * out.loss.float().item() * mb.size, weight * mb.size)
                metrics.add_values(out.values, mb.size, weight=weight)
                progress.tick()
        finally:
            inner.train(was_training)
        reduced = metrics.reduce(self._reduce_sum, names=self._metric_names(metrics.sums))
        reduced["n"] = float(len(self.eval_loader))
        return reduced
