"""The forward passes a loss builds its inputs from (`halos_core.losses.base.Forward`).

The policy runs through the distributed wrapper when training (so DDP/FSDP see every forward) and
on the unwrapped module without gradients otherwise. The reference's token log-probs come from
the on-disk cache when the same token ids were seen before (the reference is fixed for the whole
run, so the cache serves every round); on a miss they are computed by the frozen reference model,
or — with LoRA — by the policy's own base with the adapters switched off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch

from halos_core.data.collate import Microbatch, concat_streams
from halos_core.logprobs import ReferenceLogpCache, token_logps
from halos_core.lora import adapters_disabled
from halos_core.prefix_sharing import shared_prefix_token_logps
from halos_core.training.alive import PhaseProgress

log = logging.getLogger("halos_core.training")

Stream = dict[str, torch.Tensor]


class ForwardPass:
    def __init__(
        self,
        *,
        accelerator: Any,
        model: torch.nn.Module,
        reference: torch.nn.Module | None,
        lora: bool,
        reference_cache: ReferenceLogpCache | None,
        packing: bool,
        pad_token_id: int,
        prefix_sharing: bool = False,
    ):
        self.accelerator = accelerator
        self.model = model  # the prepared TokenLogprobModel
        self.reference = reference  # HF causal LM, frozen, kept on the CPU outside `precompute_reference`
        self.lora = lora
        self.reference_cache = reference_cache
        self.packing = packing
        self.prefix_sharing = prefix_sharing  # joint streams of paired losses: each prompt run once
        self.pad_token_id = pad_token_id
        self.reference_device = accelerator.device

    # ------------------------------------------------------------------ the policy
    def policy_outputs(self, stream: Stream, grad: bool, mode: str = "logps") -> Any:
        """The policy wrapper's forward in `mode` (`TokenLogprobModel`: logps | reward | values)."""
        if grad:
            return self.model(stream["input_ids"], stream["attention_mask"], stream["labels"], mode=mode)
        inner = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), self.accelerator.autocast():
            return inner(stream["input_ids"], stream["attention_mask"], stream["labels"], mode=mode)

    def policy_logps(self, stream: Stream, grad: bool, paired: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy_outputs(stream, grad, "paired_logps" if paired and self.prefix_sharing else "logps")

    # ------------------------------------------------------------------ the reference
    def reference_logps(self, stream: Stream, paired: bool = False) -> torch.Tensor:
        shared = paired and self.prefix_sharing
        cache = self.reference_cache
        if cache is not None:
            cached = cache.get(stream)
            if cached is not None:
                return cached
        if self.reference is not None:
            if next(self.reference.parameters()).device != self.reference_device:
                self.reference.to(self.reference_device)
            with torch.no_grad(), self.accelerator.autocast():
                logps, _ = self._logps(self.reference, stream, shared)
        elif self.lora:
            # LoRA: the reference is the policy's own frozen base with the adapters switched off
            lm = self.accelerator.unwrap_model(self.model).lm
            with torch.no_grad(), self.accelerator.autocast(), adapters_disabled(lm):
                logps, _ = self._logps(lm, stream, shared)
        else:
            raise RuntimeError("reference log-probs were asked for but no reference was loaded")
        if cache is not None:
            return cache.put_and_get(stream, logps)
        return logps

    def _logps(self, lm: torch.nn.Module, stream: Stream, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, labels = stream["input_ids"], stream["attention_mask"], stream["labels"]
        if shared:
            return shared_prefix_token_logps(lm, ids, mask, labels)
        return token_logps(lm, ids, mask, labels, packing=self.packing)

    def reference_streams(self, mb: Microbatch) -> list[Stream]:
        """The batches the losses run through the reference for this microbatch (same padding)."""
        if mb.kind == "paired":
            return [self.joint_stream(mb)]
        return [mb.streams[k] for k in ("target", "kl") if k in mb.streams]

    @property
    def reference_up_front(self) -> bool:
        """Whether the round's reference log-probs are computed before its first step. Only on an
        accelerator: there the pass exists so that the reference can leave device memory before
        the policy trains. On the CPU nothing moves, and a pass up front only delays the first
        step (tens of seconds): each batch's rows are computed when the batch first comes (same
        modules, same batch, same values) and served from the cache after."""
        return self.accelerator.device.type != "cpu"

    def precompute_reference(self, microbatches: Iterable[Microbatch], tag: str) -> None:
        """Fill the reference cache for `microbatches`, then move the reference off the accelerator:
        the policy trains without the reference in device memory."""
        cache = self.reference_cache
        if cache is None:
            return
        t0 = time.perf_counter()
        progress = PhaseProgress("reference log-probs")
        for mb in microbatches:
            for stream in self.reference_streams(mb.to(self.accelerator.device)):
                self.reference_logps(stream, paired=mb.kind == "paired")
            progress.tick()
        if self.reference is not None and self.accelerator.device.type != "cpu":
            self.reference.to("cpu")
            torch.cuda.empty_cache()
        self.flush_reference(tag, time.perf_counter() - t0)

    def flush_reference(self, tag: str, seconds: float | None = None) -> None:
        """Persist the rows computed in this process (one shard named `tag`) for later rounds."""
        cache = self.reference_cache
        if cache is None:
            return
        cache.flush(tag)
        log.info(
            "reference log-probs: %d rows cached (%d microbatches reused, %d computed)%s",
            len(cache.rows),
            cache.hits,
            cache.misses,
            f" in {seconds:.1f}s" if seconds is not None else "",
        )

    # ------------------------------------------------------------------ batches
    def joint_stream(self, mb: Microbatch) -> Stream:
        return concat_streams([mb.streams["chosen"], mb.streams["rejected"]], self.pad_token_id)

    def gather_rows(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """All processes' rows (padded on the token dim) so every process sees the same statistics."""
        if self.accelerator.num_processes == 1:
            return list(tensors)
        out = []
        for t in tensors:
            t = self.accelerator.pad_across_processes(t.contiguous(), dim=1, pad_index=0)
            out.append(self.accelerator.gather(t))
        return out
