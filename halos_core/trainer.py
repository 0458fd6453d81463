"""The training loop of one round: composition of models, a loss object and loaders.

`Trainer` is given the policy (wrapped so that forward returns token log-probs), the frozen
reference (or None), the loss unit (`halos_core.losses`), the train/eval loaders, the optimizer
and scheduler; it knows nothing of particular losses beyond the tensors each data kind feeds
them. `Trainer.from_config(config)` builds all of that from a `RunConfig`:

- round 1 (`init_from` None): policy = the SFT weights at `reference_path`, fresh AdamW;
- round k (`init_from` = parent round's `final/`): policy weights AND optimizer AND scheduler
  state from it, counters from `config.counters`;
- retry (`resume_from` = an intermediate checkpoint of this round): everything including the
  data position and the RNG states, so the resumed run equals an uninterrupted one;
- the reference is always the SFT model at `reference_path` (frozen, eval, no grad); its tree
  hash is checked against `config.reference_sha256` and reported in result.json.

LoRA (`config.lora`, `halos_core.lora`): the policy is the SFT model with adapters; the reference
is that same module with its adapters disabled (no second model); checkpoints hold the adapters,
`final/` also the merged weights. Heads (`halos_core.heads`): `bradley_terry` trains a reward
head on the last non-pad token, `ppo` a value head; they are saved as `head.safetensors`. A
round only continues a checkpoint that trains the same parameters (`check_compatible`).

Proofs in result.json: `restored` (init_from: digest of the live optimizer state right after the
restore, Adam step, scheduler position, lr at start; null for a round from the SFT model),
`resumed` (the same for a retry's resume point), `reference_param_digest` (the reference as loaded).

LR schedule: linear warmup over `warmup_steps` then constant, a LambdaLR keyed on the GLOBAL
optimizer step (carried across rounds), so later rounds do not warm up again.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from halos_core.checkpoint import (
    DEFAULT_KEEP_LAST,
    LoadedCheckpoint,
    SaveRequest,
    load_checkpoint,
    optimizer_state_digest,
    optimizer_step_count,
    param_digest,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from halos_core.config import RunConfig
from halos_core.data.collate import Microbatch, concat_streams
from halos_core.data.examples import DataError, ExampleSets, build_examples
from halos_core.data.loaders import Batcher, EvalLoader, TrainLoader
from halos_core.data.tokenize import ChatEncoder
from halos_core.heads import HEAD_FILE, build_head
from halos_core.logprobs import ReferenceLogpCache, TokenLogprobModel, token_logps
from halos_core.lora import (
    ADAPTER_DIR,
    ADAPTER_NAME,
    ADAPTER_WEIGHTS,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    load_adapter,
    merged_state_dict,
)
from halos_core.lora import structure as lora_structure
from halos_core.metrics import MetricAccumulator
from halos_core.run_dir import CheckpointError, RunDir, tree_sha256
from halos_core.sharded import (
    build_accelerator,
    check_supported,
    configure_wrapping,
    describe as describe_sharding,
    gather_full_state,
    gather_optimizer_state,
    is_fsdp,
    load_full_optimizer_state,
    to_plain,
)

log = logging.getLogger("halos_core.trainer")

def warmup_lambda(warmup_steps: int):
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
        reference: torch.nn.Module | None,  # HF causal LM, frozen
        tokenizer: Any,
        loss: Any,
        train_loader: TrainLoader,
        eval_loader: EvalLoader | None,
        optimizer: Any,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        position: RoundPosition,
        reference_sha256: str,
        rng_state: dict | None = None,
        keep_last: int = DEFAULT_KEEP_LAST,
        reference_cache: ReferenceLogpCache | None = None,
        restored: dict[str, Any] | None = None,
        resumed: dict[str, Any] | None = None,
        reference_param_digest: str | None = None,
        optimizer_params: list[str] | None = None,
    ):
        self.config = config
        self.hp = config.hyperparams
        self.accelerator = accelerator
        self.model = model
        self.reference = reference
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
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.round_step = position.round_step
        self.reference_cache = reference_cache
        self.reference_device = accelerator.device
        # proofs recorded in result.json (see `restore_record`)
        self.restored = restored
        self.resumed = resumed
        self.reference_param_digest = reference_param_digest
        self.optimizer_params = optimizer_params
        self.lora = config.lora
        self.sharded = is_fsdp(accelerator)  # FSDP2: parameters and optimizer state are sharded

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: RunConfig, *, accelerator: Any = None, keep_last: int = DEFAULT_KEEP_LAST) -> "Trainer":
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env, set_seed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from halos_core.losses import build_loss

        hp = config.hyperparams
        run_dir = RunDir(config.run_dir)
        loss = build_loss(config.loss, hp)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:  # noqa: BLE001 - cosmetic
            pass
        if accelerator is None:
            # CPU when asked by the launcher (ACCELERATE_USE_CPU) or when there is no GPU: accelerate
            # only forms a multi-process CPU (gloo) group when told `cpu=True`.
            cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
            state = PartialState(cpu=cpu)
            # an FSDP launch (accelerate.yaml `distributed_type: FSDP`) gets FSDP2 on CPU too (halos_core.sharded)
            accelerator = build_accelerator(
                cpu=cpu,
                gradient_accumulation_steps=hp.gradient_accumulation_steps(state.num_processes),
                mixed_precision=config.mixed_precision,
            )
        # FSDP: FSDP2 with full weights (and heads); LoRA + FSDP and DeepSpeed are refused here
        check_supported(accelerator, lora=config.lora is not None)
        sharded = is_fsdp(accelerator)
        main = accelerator.is_main_process
        if main:
            log.info(
                "accelerate: %s, %d process(es), backend %s, device %s, gradient accumulation %d",
                accelerator.distributed_type, accelerator.num_processes, accelerator.state.backend,
                accelerator.device, accelerator.gradient_accumulation_steps,
            )
        if main:
            run_dir.create()
            run_dir.clean_partial_checkpoints()
        accelerator.wait_for_everyone()
        set_seed(hp.seed)

        # ---- the pinned reference (hash it before anything else reads it)
        reference_sha256 = tree_sha256(config.reference_path) if main else config.reference_sha256
        if main and config.reference_sha256 and reference_sha256 != config.reference_sha256:
            raise ValueError(
                f"reference model {config.reference_path} has tree sha256 {reference_sha256}, "
                f"the run pins {config.reference_sha256}: the SFT checkpoint changed"
            )

        # ---- checkpoint to start from (verified before any weights are read)
        ckpt: LoadedCheckpoint | None = None
        if config.resume_from:
            ckpt = load_checkpoint(config.resume_from, process_index=accelerator.process_index)
            if ckpt.trainer_state.get("job_id") not in (None, config.job_id):
                raise CheckpointError(
                    f"resume_from {config.resume_from} belongs to job {ckpt.trainer_state.get('job_id')}, not {config.job_id}"
                )
        elif config.init_from:
            ckpt = load_checkpoint(config.init_from, process_index=accelerator.process_index)
        if ckpt is not None:
            check_compatible(ckpt, config, loss.name)
        weights_from = str(ckpt.path) if ckpt else config.reference_path

        tokenizer = AutoTokenizer.from_pretrained(weights_from)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

        # ---- data
        examples = load_examples(config, loss.data_kind)
        if not examples.train:
            raise DataError(
                f"no training examples for loss '{loss.name}' ({loss.data_kind} data) in "
                f"{len(config.feedback)} feedback file(s) ({len(examples.eval)} eval examples)"
            )
        encoder = ChatEncoder(tokenizer, hp.max_length, hp.max_prompt_length)
        batcher = Batcher(
            encoder,
            loss.data_kind,
            kl_pairs=loss.name == "kto",
            control_tokens=getattr(loss, "control_tokens", None),
        )
        train_loader = TrainLoader(
            examples.train,
            batcher,
            batch_size=hp.batch_size,
            microbatch_size=hp.microbatch_size,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            n_epochs=hp.n_epochs,
            seed=hp.seed,
        )
        if train_loader.total_steps == 0:
            raise DataError(
                f"{len(examples.train)} training examples for loss '{loss.name}' are fewer than batch_size "
                f"{hp.batch_size}: the round would run 0 steps"
            )
        eval_loader = (
            EvalLoader(
                examples.eval,
                batcher,
                microbatch_size=hp.microbatch_size,
                num_processes=accelerator.num_processes,
                process_index=accelerator.process_index,
            )
            if examples.eval
            else None
        )

        # ---- models
        ref_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
        reference = None
        reference_digest = None
        if config.lora is not None:
            # the SFT model, frozen, with adapters; with adapters disabled it IS the reference
            base = AutoModelForCausalLM.from_pretrained(config.reference_path, dtype="auto")
            if loss.needs_reference:
                reference_digest = param_digest(base)
            base.to(ref_dtype)
            base.config.use_cache = False
            policy = apply_lora(base, config.lora)
            if ckpt is not None:
                load_adapter(policy, ckpt.path)
        else:
            policy = AutoModelForCausalLM.from_pretrained(weights_from, dtype=torch.float32)  # master weights
            policy.config.use_cache = False
            if loss.needs_reference:
                # loaded in the file's dtype so its digest can be checked against model.safetensors, then cast
                reference = AutoModelForCausalLM.from_pretrained(config.reference_path, dtype="auto")
                reference_digest = param_digest(reference)
                reference.to(ref_dtype)
                # kept on the CPU: `precompute_reference` moves it to the device for the one pass that
                # fills the reference cache (`_reference_logps` moves it on a cache miss) and back off
                # after, so the full unsharded reference is never on the device while the policy
                # (sharded under FSDP) trains
                reference.eval().requires_grad_(False)

        if hp.gradient_checkpointing:
            # before DDP/FSDP wrapping; non-reentrant, so the layers' inputs need not require grad
            # (no enable_input_require_grads for LoRA's frozen embeddings)
            # (transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable)
            enable = getattr(policy, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        head = build_head(loss.name, hidden_size(policy.config))
        if head is not None:
            if ckpt is not None:
                load_head(head, ckpt.path)
            if loss.name == "bradley_terry" and config.lora is None:
                freeze_unused_lm_head(policy)  # the reward model never runs the LM head (DDP needs every trained param used)

        # chunk size from the vocabulary (bounded logits memory); packed sequences when hp.packing
        model = TokenLogprobModel(policy, head=head, packing=hp.packing)
        model.train()
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        param_names = [n for n, _ in trained]
        if ckpt is not None and ckpt.trainer_state.get("optimizer_params") not in (None, param_names):
            raise CheckpointError(
                f"checkpoint {ckpt.path}: its optimizer holds other parameters than this round trains "
                f"({len(ckpt.trainer_state['optimizer_params'])} vs {len(param_names)})"
            )
        optimizer = torch.optim.AdamW([p for _, p in trained], lr=hp.lr, weight_decay=hp.weight_decay)
        if sharded:
            configure_wrapping(accelerator, policy)
        model, optimizer = accelerator.prepare(model, optimizer)
        if sharded:
            shards = describe_sharding(model)
            log.info(
                "FSDP2 rank %d: %d units, %d of %d parameter elements held locally",
                accelerator.process_index, shards["units"], shards["local_numel"], shards["numel"],
            )
        raw_optimizer = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(raw_optimizer, warmup_lambda(hp.warmup_steps))

        # ---- counters and state
        if config.resume_from:
            ts = ckpt.trainer_state
            if int(ts.get("total_steps", train_loader.total_steps)) != train_loader.total_steps or int(
                ts.get("batch_size", hp.batch_size)
            ) != hp.batch_size:
                raise CheckpointError(
                    f"resume_from {config.resume_from} was written for {ts.get('total_steps')} steps of batch "
                    f"{ts.get('batch_size')}; this round has {train_loader.total_steps} of {hp.batch_size}"
                )
            round_step = int(ts["round_step"])
            position = RoundPosition(
                step_offset=int(ts["step"]) - round_step,
                examples_offset=int(ts["examples"]) - int(ts["data_position"]),
                round_step=round_step,
            )
        else:
            position = RoundPosition(config.counters.step, config.counters.examples, 0)
        record = None
        if ckpt is not None:
            if sharded:
                # every rank read the full optimizer.pt; each keeps its shard of every moment (collective)
                load_full_optimizer_state(model, optimizer, ckpt.optimizer_state, param_names)
            else:
                optimizer.load_state_dict(ckpt.optimizer_state)
            scheduler.load_state_dict(ckpt.scheduler_state)
            # from the live objects, right after the restore (sharded: gathered back, complete, on rank 0)
            live = gather_optimizer_state(model, optimizer) if sharded else None
            record = restore_record(ckpt.path, optimizer, scheduler, optimizer_state=live)
        align_schedule(scheduler, hp.lr, hp.weight_decay, position.step_offset + position.round_step)
        if record is not None:
            record["lr_at_start"] = scheduler.get_last_lr()[0]
        if config.resume_from:
            # a retry: report what the first attempt restored from init_from (kept in the checkpoint's
            # trainer_state) as `restored`, and this attempt's restore point as `resumed`
            restored, resumed = ckpt.trainer_state.get("restored"), record
        else:
            restored, resumed = record, None

        return cls(
            config=config,
            accelerator=accelerator,
            model=model,
            reference=reference,
            tokenizer=tokenizer,
            loss=loss,
            train_loader=train_loader,
            eval_loader=eval_loader,
            optimizer=optimizer,
            scheduler=scheduler,
            position=position,
            reference_sha256=reference_sha256,
            rng_state=ckpt.rng_state if (ckpt is not None and config.resume_from) else None,
            keep_last=keep_last,
            restored=restored,
            resumed=resumed,
            reference_param_digest=reference_digest,
            optimizer_params=param_names,
            reference_cache=(
                ReferenceLogpCache(
                    config.reference_cache_dir, config.reference_sha256 or reference_sha256, config.mixed_precision
                )
                if loss.needs_reference
                else None
            ),
        )

    # ------------------------------------------------------------------ forward + loss
    def _policy(self, stream: dict[str, torch.Tensor], grad: bool, mode: str = "logps"):
        """The policy's forward (`TokenLogprobModel` modes): through the distributed wrapper when
        training, on the unwrapped module without gradients otherwise."""
        if grad:
            return self.model(stream["input_ids"], stream["attention_mask"], stream["labels"], mode=mode)
        inner = self.accelerator.unwrap_model(self.model)
        with torch.no_grad(), self.accelerator.autocast():
            return inner(stream["input_ids"], stream["attention_mask"], stream["labels"], mode=mode)

    def _policy_logps(self, stream: dict[str, torch.Tensor], grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self._policy(stream, grad)

    def _reference_logps(self, stream: dict[str, torch.Tensor]) -> torch.Tensor:
        cache = self.reference_cache
        if cache is not None:
            cached = cache.get(stream)
            if cached is not None:
                return cached
        if self.reference is not None:
            if next(self.reference.parameters()).device != self.reference_device:
                self.reference.to(self.reference_device)
            with torch.no_grad(), self.accelerator.autocast():
                logps, _ = token_logps(
                    self.reference, stream["input_ids"], stream["attention_mask"], stream["labels"], packing=self.hp.packing
                )
        elif self.lora is not None:
            # LoRA: the reference is the policy's own frozen base with the adapters switched off
            lm = self.accelerator.unwrap_model(self.model).lm
            with torch.no_grad(), self.accelerator.autocast(), adapters_disabled(lm):
                logps, _ = token_logps(lm, stream["input_ids"], stream["attention_mask"], stream["labels"], packing=self.hp.packing)
        else:
            raise RuntimeError(f"loss '{self.loss.name}' needs reference log-probs but no reference was loaded")
        if cache is not None:
            cache.put(stream, logps)
        return logps

    def _reference_streams(self, mb: Microbatch) -> list[dict[str, torch.Tensor]]:
        """The batches `compute_loss` runs through the reference for this microbatch (same padding)."""
        if self.loss.data_kind == "paired":
            return [concat_streams([mb.streams["chosen"], mb.streams["rejected"]], self.pad_token_id)]
        return [mb.streams[k] for k in ("target", "kl") if k in mb.streams]

    def precompute_reference(self) -> None:
        """Fill the reference cache for the rest of the round (and the eval set), then move the
        reference off the accelerator: the policy trains without the reference in device memory."""
        if not self.loss.needs_reference or self.reference_cache is None:
            return
        t0 = time.perf_counter()
        batches = (mb for step in range(self.round_step, self.train_loader.total_steps) for mb in self.train_loader.microbatches(step))
        for mb in batches:
            for stream in self._reference_streams(mb.to(self.accelerator.device)):
                self._reference_logps(stream)
        for mb, _ in self.eval_loader.padded() if self.eval_loader is not None else ():
            for stream in self._reference_streams(mb.to(self.accelerator.device)):
                self._reference_logps(stream)
        if self.reference is not None and self.accelerator.device.type != "cpu":
            self.reference.to("cpu")
            torch.cuda.empty_cache()
        cache = self.reference_cache
        cache.flush(f"{self.config.job_id}-rank{self.accelerator.process_index}")
        log.info(
            "reference log-probs: %d rows cached (%d microbatches reused, %d computed) in %.1fs",
            len(cache.rows), cache.hits, cache.misses, time.perf_counter() - t0,
        )

    def _gather_rows(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """All processes' rows (padded on the token dim) so every process sees the same KL estimate."""
        if self.accelerator.num_processes == 1:
            return list(tensors)
        out = []
        for t in tensors:
            t = self.accelerator.pad_across_processes(t.contiguous(), dim=1, pad_index=0)
            out.append(self.accelerator.gather(t))
        return out

    def compute_loss(self, mb: Microbatch, train: bool = True):
        kind = self.loss.data_kind
        need_ref = self.loss.needs_reference
        if self.loss.name == "bradley_terry":
            (both,) = self._reference_streams(mb)
            scores = self._policy(both, grad=train, mode="reward")
            n = mb.size
            return self.loss.compute(chosen_scores=scores[:n], rejected_scores=scores[n:])
        if self.loss.name == "ppo":
            target = mb.streams["target"]
            logps, mask, values = self._policy(target, grad=train, mode="values")
            ref = self._reference_logps(target)
            # HALOs: +1 for a desirable output, -1 for an undesirable one, on its last token;
            # the reference's log-probs are the behaviour policy's (offline, one step)
            rewards = torch.where(mb.desirable, 1.0, -1.0).to(device=logps.device, dtype=torch.float32)
            return self.loss.compute(
                policy_logps=logps, old_policy_logps=ref, values=values, rewards=rewards, mask=mask,
            )
        if kind == "paired":
            (both,) = self._reference_streams(mb)
            logps, mask = self._policy_logps(both, grad=train)
            ref = self._reference_logps(both) if need_ref else None
            n = mb.size
            return self.loss.compute(
                policy_chosen_logps=logps[:n],
                policy_rejected_logps=logps[n:],
                reference_chosen_logps=None if ref is None else ref[:n],
                reference_rejected_logps=None if ref is None else ref[n:],
                chosen_mask=mask[:n],
                rejected_mask=mask[n:],
            )
        if kind == "unpaired" and self.loss.name == "kto":
            target = mb.streams["target"]
            logps, mask = self._policy_logps(target, grad=train)
            ref = self._reference_logps(target)
            kl_stream = mb.streams["kl"]
            kl_logps, kl_mask = self._policy_logps(kl_stream, grad=False)
            kl_ref = self._reference_logps(kl_stream)
            if train:
                kl_logps, kl_ref, kl_mask = self._gather_rows(kl_logps, kl_ref, kl_mask.long())
                kl_mask = kl_mask.bool()
            d = mb.desirable
            return self.loss.compute(
                policy_chosen_logps=logps[d],
                policy_rejected_logps=logps[~d],
                policy_kl_logps=kl_logps,
                reference_chosen_logps=ref[d],
                reference_rejected_logps=ref[~d],
                reference_kl_logps=kl_ref,
                chosen_mask=mask[d],
                rejected_mask=mask[~d],
                kl_mask=kl_mask,
            )
        if kind in ("sft", "unpaired"):  # sft, csft
            logps, mask = self._policy_logps(mb.streams["target"], grad=train)
            return self.loss.compute(policy_logps=logps, mask=mask)
        if kind == "grouped":
            target = mb.streams["target"]
            logps, mask = self._policy_logps(target, grad=train)
            ref = self._reference_logps(target)
            return self.loss.compute(
                policy_logps=logps,
                reference_logps=ref,
                mask=mask,
                prompt_ids=mb.group,
                scores=mb.scores,
                advantages=mb.advantages,
            )
        raise ValueError(f"no forward for data kind {kind!r} and loss {self.loss.name!r}")

    # ------------------------------------------------------------------ state
    def global_step(self) -> int:
        return self.position.step_offset + self.round_step

    def round_examples(self) -> int:
        return self.round_step * self.hp.batch_size

    def global_examples(self) -> int:
        return self.position.examples_offset + self.round_examples()

    def trainer_state(self, kind: str) -> dict[str, Any]:
        loader = self.train_loader
        return {
            "kind": kind,
            "job_id": self.config.job_id,
            "step": self.global_step(),
            "examples": self.global_examples(),
            "round_step": self.round_step,
            "data_position": self.round_examples(),
            "epoch": self.round_step / loader.steps_per_epoch,
            "total_steps": loader.total_steps,
            "batch_size": self.hp.batch_size,
            "seed": self.hp.seed,
            "loss": self.loss.name,
            "reference_sha256": self.reference_sha256,
            "init_from": self.config.init_from,
            "lr": self.scheduler.get_last_lr()[0],
            "restored": self.restored,
            "reference_param_digest": self.reference_param_digest,
            "lora": lora_structure(self.lora) if self.lora is not None else None,
            "head": self._head().describe() if self._head() is not None else None,
            "optimizer_params": self.optimizer_params,
        }

    def _head(self) -> torch.nn.Module | None:
        return self.accelerator.unwrap_model(self.model).head

    def save(self, target: Path, kind: str):
        acc = self.accelerator
        inner = acc.unwrap_model(self.model)
        main = acc.is_main_process
        tensor_files: dict[str, dict[str, torch.Tensor]] = {}
        writers = []
        model = state_dict = None
        optimizer_state = None
        head_state = None
        if self.sharded:
            # every rank: all-gather the full weights and the COMPLETE optimizer state (rank 0 gets them)
            full, optimizer_state = gather_full_state(self.model, self.optimizer)
            state_dict = {k[len("lm.") :]: v for k, v in full.items() if k.startswith("lm.")}
            head_state = {k[len("head.") :]: v for k, v in full.items() if k.startswith("head.")}
            model = inner.lm
        elif self.lora is not None:
            lm = inner.lm
            if main:
                tensor_files[f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"] = adapter_state_dict(lm)
                writers.append(lambda d: lm.peft_config[ADAPTER_NAME].save_pretrained(str(d / ADAPTER_DIR)))
                if kind == "final" and self.lora.merge_on_export:
                    model, state_dict = lm.get_base_model(), merged_state_dict(lm)
        else:
            full = acc.get_state_dict(self.model)  # every rank (a sharded model gathers here)
            state_dict = {k[len("lm.") :]: v for k, v in full.items() if k.startswith("lm.")}
            model = inner.lm
        if inner.head is not None:
            tensor_files[HEAD_FILE] = head_state if self.sharded else dict(inner.head.state_dict())
        request = SaveRequest(
            model=model,
            tokenizer=self.tokenizer,
            optimizer_state=optimizer_state if self.sharded else self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(),
            trainer_state=self.trainer_state(kind),
            state_dict=state_dict,
            tensor_files=tensor_files,
            writers=writers,
        )
        extra = {
            "kind": kind,
            "job_id": self.config.job_id,
            "round_step": self.round_step,
            "total_steps": self.train_loader.total_steps,
            "reference_sha256": self.reference_sha256,
            "parent": self.config.init_from,
            "lora": self.lora is not None,
            "merged": model is not None and self.lora is not None,
            "head": inner.head.kind if inner.head is not None else None,
        }
        return save_checkpoint(
            target,
            request,
            process_index=acc.process_index,
            num_processes=acc.num_processes,
            barrier=acc.wait_for_everyone,
            manifest_extra=extra,
        )

    # ------------------------------------------------------------------ loop
    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return t
        return self.accelerator.reduce(t.to(self.accelerator.device), reduction="sum").cpu()

    def _metric_names(self, local) -> list[str]:
        """The union of every process's metric names (a collective): one rank-independent list."""
        if self.accelerator.num_processes == 1:
            return sorted(local)
        gathered: list[Any] = [None] * self.accelerator.num_processes
        torch.distributed.all_gather_object(gathered, sorted(local))
        return sorted(set().union(*gathered))

    def train(self, stop_after: int | None = None) -> dict[str, Any]:
        """Run the round to the end (or raise `Stopped` after round step `stop_after`)."""
        acc, hp, loader = self.accelerator, self.hp, self.train_loader
        self.precompute_reference()
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
                self.save(self.run_dir.checkpoint_path(self.global_step()), "intermediate")
                if acc.is_main_process:
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
        manifest = self.save(self.run_dir.final, "final")
        result = None
        if acc.is_main_process:
            result = {
                "status": "ok",
                "job_id": self.config.job_id,
                "final_dir": str(self.run_dir.final.resolve()),
                "manifest_sha256": manifest.sha256,
                "step": self.global_step(),
                "examples": self.global_examples(),
                "round_steps": self.round_step,
                "total_steps": total,
                "eval": eval_metrics,
                "reference_sha256": self.reference_sha256,
                "reference_param_digest": self.reference_param_digest,
                "restored": self.restored,
                "loss": self.loss.name,
                "lora": lora_structure(self.lora) | {"merged": self.lora.merge_on_export} if self.lora is not None else None,
                "head": self._head().kind if self._head() is not None else None,
            }
            if self.resumed is not None:
                result["resumed"] = self.resumed
            self.run_dir.write_result(result)
        acc.wait_for_everyone()
        return result or {}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        inner = self.accelerator.unwrap_model(self.model)
        was_training = inner.training
        inner.eval()
        metrics = MetricAccumulator()
        try:
            # the same number of forwards on every process (FSDP forwards are collectives); a
            # process with fewer eval examples runs padding microbatches of weight 0
            for mb, weight in self.eval_loader.padded():
                mb = mb.to(self.accelerator.device)
                out = self.compute_loss(mb, train=False)
                metrics.add("loss", weight * out.loss.float().item() * mb.size, weight * mb.size)
                metrics.add_values(out.values, mb.size, weight=weight)
        finally:
            inner.train(was_training)
        reduced = metrics.reduce(self._reduce_sum, names=self._metric_names(metrics.sums))
        reduced["n"] = float(len(self.eval_loader))
        return reduced


def hidden_size(config: Any) -> int:
    size = getattr(config, "hidden_size", None)
    if size is None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "hidden_size", None)
    if size is None:
        raise TypeError(f"cannot tell the hidden size of {type(config).__name__}")
    return int(size)


def freeze_unused_lm_head(model: torch.nn.Module) -> None:
    """Freeze the LM head of a reward model (it never runs), unless it is tied to the input embeddings."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and (emb is None or head.weight is not emb.weight):
        head.requires_grad_(False)


def load_head(head: torch.nn.Module, checkpoint: Path | str) -> None:
    from safetensors.torch import load_file

    file = Path(checkpoint) / HEAD_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} holds no {head.kind} head ({HEAD_FILE})")
    try:
        head.load_state_dict(load_file(str(file)), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {checkpoint}: {HEAD_FILE} does not fit this head: {str(exc)[:300]}") from exc


def check_compatible(ckpt: LoadedCheckpoint, config: RunConfig, loss_name: str) -> None:
    """Refuse (before any weights are read) a checkpoint whose trainable state this round cannot
    continue: LoRA vs full weights, other LoRA shapes, another head. Optimizer state only carries
    over between rounds that train the same parameters."""
    from halos_core.heads import HEAD_KINDS

    state = ckpt.trainer_state
    have_lora, want_lora = state.get("lora"), (lora_structure(config.lora) if config.lora is not None else None)
    if have_lora != want_lora:
        what = lambda x: "full weights" if x is None else f"LoRA {x}"  # noqa: E731
        raise CheckpointError(
            f"checkpoint {ckpt.path} was trained with {what(have_lora)}; this round trains {what(want_lora)}: "
            "its weights and optimizer state cannot be continued (start from the SFT model, or keep the run's settings)"
        )
    have_head = (state.get("head") or {}).get("kind")
    want_head = HEAD_KINDS.get(loss_name)
    if have_head != want_head:
        raise CheckpointError(
            f"checkpoint {ckpt.path} has {'a ' + have_head + ' head' if have_head else 'no head'} (loss "
            f"{state.get('loss')!r}); loss {loss_name!r} trains {'a ' + want_head + ' head' if want_head else 'no head'}: "
            "its optimizer state cannot be continued"
        )


def restore_record(source: Path | str, optimizer: Any, scheduler: Any, optimizer_state: dict | None = None) -> dict[str, Any]:
    """What was just restored, read back from the LIVE optimizer and scheduler (not the files):
    the digest of the optimizer's per-parameter state (`checkpoint.optimizer_state_digest`,
    comparable with the digest of the parent's optimizer.pt), its Adam step count and the
    scheduler's position. `lr_at_start` is added once this round's schedule is applied.
    `optimizer_state`: the live state gathered from the shards (FSDP; complete on rank 0 only)."""
    state = optimizer.state_dict() if optimizer_state is None else optimizer_state
    return {
        "from": str(source),
        "optimizer_state_digest": optimizer_state_digest(state),
        "optimizer_step": optimizer_step_count(state),
        "scheduler_last_epoch": int(scheduler.last_epoch),
    }


def align_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float, weight_decay: float, global_step: int) -> None:
    """Key the schedule on the global step and apply this round's lr / weight decay.

    After a restore, `last_epoch` is the parent's global step already; it is set explicitly so a
    round that starts from the SFT weights with carried counters is keyed the same way, and so
    a round that overrides `lr` uses its own base lr (not the one saved in the parent's state).
    """
    scheduler.base_lrs = [lr for _ in scheduler.optimizer.param_groups]
    scheduler.last_epoch = global_step
    factors = [fn(global_step) for fn in scheduler.lr_lambdas]
    for group, factor in zip(scheduler.optimizer.param_groups, factors):
        group["initial_lr"] = lr
        group["lr"] = lr * factor
        group["weight_decay"] = weight_decay
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def load_examples(config: RunConfig, data_kind: str) -> ExampleSets:
    """Read every feedback file (file-scoped prompt ids), apply the round's conversion, build examples."""
    from halos_core.feedback import apply_conversion, read_records

    hp = config.hyperparams
    files = []
    for item in config.feedback:
        records = list(read_records(item.path))
        if config.conversion is not None:
            records = list(apply_conversion(records, config.conversion, hp.seed))
        files.append((item.file_id, records))
    return build_examples(
        files,
        data_kind,
        seed=hp.seed,
        max_pairs_per_prompt=hp.max_pairs_per_prompt,
        eval_fraction=hp.eval_fraction,
    )
