"""Deterministic, resumable, sharded loaders.

The training stream is defined by (examples, seed, batch_size) alone, independent of how many
processes consume it, so a run can be resumed (and counted) by its *data position*: the number
of examples consumed in this round, always a multiple of `batch_size`.

- Epoch `e` visits the examples in the order of a `random.Random(f"{seed}:epoch:{e}")` shuffle.
- Each epoch has `len(examples) // batch_size` optimizer steps; the incomplete tail is dropped
  (every process runs the same number of steps, and no step is smaller than the others).
- Optimizer step `s` (within the round) takes the global batch
  `order[e][j*batch_size : (j+1)*batch_size]` (e, j = divmod(s, steps_per_epoch)); its
  accumulation microbatch `k` on process `r` is the slice
  `[k*mb*P + r*mb, k*mb*P + (r+1)*mb)` of that batch (mb = microbatch_size, P = processes).
- Sequences are tokenised lazily (only what is consumed) and padded to the longest of the
  microbatch.
- KTO's KL pairs: within each microbatch, prompt i with the output of example i+1 (cyclically),
  as HALOs' UnpairedPreferenceDataLoader does.
- `bucket_by_length=True` (off by default): the global batch is sorted by a length estimate
  (`example_length`: characters of prompt + outputs; ties by index) before it is cut into
  microbatches, so each accumulation microbatch (and each process's share of it) holds
  sequences of similar length and pads little. Which examples form each optimizer step is
  unchanged (the window is the global batch), and it stays a function of (examples, seed,
  batch_size). Trade-off: the grouping INTO microbatches changes, so losses normalised per
  microbatch (SFT's and GRPO's token means, PPO's masked means, KTO's KL pairs and its
  per-microbatch KL estimate) see different groups than without it, so the gradient of a step
  differs slightly; for per-example-mean losses (DPO family) with a fixed microbatch size it does
  not (up to float summation order).
  Padding inside a microbatch is removed without changing any grouping by sequence packing
  (`halos_core.data.packing`, hp.packing).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from .collate import Microbatch, pad_stream
from .examples import GroupedExample, PairedExample, SFTExample, Turns, UnpairedExample
from .tokenize import ChatEncoder


def _prefix_control(output: Turns, token: str | None) -> Turns:
    if not token or not output:
        return output
    (role, content), *rest = output
    return ((role, token + content), *rest)


class Batcher:
    """Tokenises and collates a list of examples into a `Microbatch`."""

    def __init__(
        self,
        encoder: ChatEncoder,
        data_kind: str,
        kl_pairs: bool = False,
        control_tokens: tuple[str, str] | None = None,
    ):
        self.encoder = encoder
        self.data_kind = data_kind
        self.kl_pairs = kl_pairs
        self.control_tokens = control_tokens

    def __call__(self, examples: Sequence) -> Microbatch:
        enc, pad = self.encoder.encode, self.encoder.pad_token_id
        n = len(examples)
        kind = self.data_kind
        if kind == "paired":
            ex: Sequence[PairedExample] = examples
            streams = {
                "chosen": pad_stream([enc(e.prompt, e.chosen) for e in ex], pad),
                "rejected": pad_stream([enc(e.prompt, e.rejected) for e in ex], pad),
            }
            return Microbatch(kind, streams, n)
        if kind == "unpaired":
            ux: Sequence[UnpairedExample] = examples
            outputs = [
                _prefix_control(e.output, self.control_tokens[0 if e.desirable else 1] if self.control_tokens else None)
                for e in ux
            ]
            streams = {"target": pad_stream([enc(e.prompt, o) for e, o in zip(ux, outputs)], pad)}
            if self.kl_pairs:
                streams["kl"] = pad_stream([enc(ux[i].prompt, ux[(i + 1) % n].output) for i in range(n)], pad)
            desirable = torch.tensor([e.desirable for e in ux], dtype=torch.bool)
            return Microbatch(kind, streams, n, desirable=desirable)
        if kind == "sft":
            sx: Sequence[SFTExample] = examples
            return Microbatch(kind, {"target": pad_stream([enc(e.prompt, e.target) for e in sx], pad)}, n)
        if kind == "grouped":
            gx: Sequence[GroupedExample] = examples
            return Microbatch(
                kind,
                {"target": pad_stream([enc(e.prompt, e.output) for e in gx], pad)},
                n,
                group=torch.tensor([e.group for e in gx], dtype=torch.long),
                scores=torch.tensor([e.score for e in gx], dtype=torch.float32),
                advantages=torch.tensor([e.advantage for e in gx], dtype=torch.float32),
            )
        raise ValueError(f"unknown data kind {kind!r}")


def example_length(example) -> int:
    """A tokenisation-free length estimate: characters of the prompt and of every output."""
    parts = [example.prompt]
    for name in ("chosen", "rejected", "output", "target"):
        turns_ = getattr(example, name, None)
        if turns_ is not None:
            parts.append(turns_)
    return sum(len(content) for turns_ in parts for _, content in turns_)


class TrainLoader:
    def __init__(
        self,
        examples: Sequence,
        batcher: Batcher,
        *,
        batch_size: int,
        microbatch_size: int,
        num_processes: int = 1,
        process_index: int = 0,
        n_epochs: int = 1,
        seed: int = 0,
        bucket_by_length: bool = False,
    ):
        per_pass = microbatch_size * num_processes
        if batch_size % per_pass:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by microbatch_size {microbatch_size} "
                f"x num_processes {num_processes}"
            )
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} out of range for {num_processes} processes")
        self.examples = list(examples)
        self.batcher = batcher
        self.batch_size = batch_size
        self.microbatch_size = microbatch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.n_epochs = n_epochs
        self.seed = seed
        self.bucket_by_length = bucket_by_length
        self.gradient_accumulation_steps = batch_size // per_pass
        self.steps_per_epoch = len(self.examples) // batch_size
        self.total_steps = self.steps_per_epoch * n_epochs
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            idx = list(range(len(self.examples)))
            random.Random(f"{self.seed}:epoch:{epoch}").shuffle(idx)
            self._orders = {epoch: idx}  # keep only the current epoch's order
        return self._orders[epoch]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch if self.steps_per_epoch else 0

    def step_indices(self, step: int) -> list[int]:
        """Indices of the global batch of optimizer step `step` (0-based, within the round)."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside 0..{self.total_steps - 1}")
        epoch, j = divmod(step, self.steps_per_epoch)
        return self.order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]

    def local_indices(self, step: int) -> list[list[int]]:
        """This process's microbatches (lists of example indices) for `step`."""
        batch = self.step_indices(step)
        if self.bucket_by_length:
            batch = sorted(batch, key=lambda i: (example_length(self.examples[i]), i))
        mb, p, r = self.microbatch_size, self.num_processes, self.process_index
        return [batch[k * mb * p + r * mb : k * mb * p + (r + 1) * mb] for k in range(self.gradient_accumulation_steps)]

    def microbatches(self, step: int) -> list[Microbatch]:
        return [self.batcher([self.examples[i] for i in idx]) for idx in self.local_indices(step)]

    def position_to_step(self, position: int) -> int:
        if position % self.batch_size:
            raise ValueError(f"data position {position} is not a multiple of batch_size {self.batch_size}")
        return position // self.batch_size

    def iter_steps(self, position: int = 0) -> Iterator[tuple[int, list[Microbatch]]]:
        """(step, this process's microbatches) from data position `position` to the end."""
        for step in range(self.position_to_step(position), self.total_steps):
            yield step, self.microbatches(step)


class EvalLoader:
    """The eval set in order, sharded by example index (i % P == rank), last microbatch partial.

    Every process must run the SAME number of eval forwards (an FSDP forward all-gathers the
    shards; the metric reduction is a collective): `padded()` yields this process's microbatches
    followed by padding microbatches (a copy of the first eval example, metric weight 0) up to
    `num_microbatches`, the count of the longest shard. Iterating the loader yields only the real ones.
    """

    def __init__(
        self,
        examples: Sequence,
        batcher: Batcher,
        *,
        microbatch_size: int,
        num_processes: int = 1,
        process_index: int = 0,
    ):
        self.examples = list(examples)
        self.batcher = batcher
        self.microbatch_size = microbatch_size
        self.num_processes = num_processes
        self.shard = [e for i, e in enumerate(self.examples) if i % num_processes == process_index]
        self.num_microbatches = max(
            (len(self._chunks(self.examples[r::num_processes])) for r in range(num_processes)), default=0
        )

    def __len__(self) -> int:
        return len(self.examples)

    def _chunks(self, shard: list) -> list[list]:
        mb = self.microbatch_size
        chunks = [shard[i : i + mb] for i in range(0, len(shard), mb)]
        # A KL pair needs a second example: fold a trailing singleton into the previous chunk.
        if self.batcher.kl_pairs and len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks[-2] = chunks[-2] + chunks.pop()
        return chunks

    def __iter__(self) -> Iterator[Microbatch]:
        for chunk in self._chunks(self.shard):
            yield self.batcher(chunk)

    def padded(self) -> Iterator[tuple[Microbatch, float]]:
        """(microbatch, metric weight): the real ones (weight 1), then padding (weight 0) so that
        every process yields exactly `num_microbatches`."""
        n = 0
        for mb in self:
            n += 1
            yield mb, 1.0
        for _ in range(self.num_microbatches - n):
            yield self.batcher(self.examples[:1]), 0.0
