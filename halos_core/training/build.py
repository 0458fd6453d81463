"""Building a round's `Trainer` from its `RunConfig`: accelerator, data, models, optimizer, restore.

- round 1 (`init_from` None): policy = the SFT weights at `reference_path`, fresh AdamW;
- round k (`init_from` = parent round's `final/`): policy weights AND optimizer AND scheduler
  state from it, counters from `config.counters`;
- retry (`resume_from` = an intermediate checkpoint of this round): everything including the
  data position and the RNG states, so the resumed run equals an uninterrupted one;
- the reference is always the SFT model at `reference_path` (frozen, eval, no grad); its tree
  hash is checked against `config.reference_sha256` and reported in result.json.

LoRA (`config.lora`, `halos_core.lora`): the policy is the SFT model with adapters; the reference
is that same module with its adapters disabled (no second model); checkpoints hold the adapters,
`final/` also the merged weights. Heads (`halos_core.heads`): a loss declared with a head trains
it on the policy (`bradley_terry`: reward head, `ppo`: value head); it is saved as
`head.safetensors`. A round only continues a checkpoint that trains the same parameters
(`check_compatible`, the rule in `halos_core.compat`).

Proofs in result.json: `restored` (init_from: digest of the live optimizer state right after the
restore, Adam step, scheduler position, lr at start; null for a round from the SFT model),
`resumed` (the same for a retry's resume point), `reference_param_digest` (the reference as loaded).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from halos_core.checkpoint import (
    DEFAULT_KEEP_LAST,
    LoadedCheckpoint,
    load_checkpoint,
    optimizer_state_digest,
    optimizer_step_count,
    param_digest,
)
from halos_core.compat import incompatibility, recorded_params, round_params
from halos_core.data.examples import DataError, ExampleSets, build_examples
from halos_core.data.loaders import Batcher, EvalLoader, TrainLoader
from halos_core.data.tokenize import ChatEncoder
from halos_core.heads import HEAD_FILE, build_head
from halos_core.job_spec import RunConfig
from halos_core.logprobs import ReferenceLogpCache, TokenLogprobModel
from halos_core.lora import apply_lora, load_adapter
from halos_core.losses import build_loss
from halos_core.round_result import RestoreRecord
from halos_core.run_dir import CheckpointError, RunDir, tree_sha256
from halos_core.sharded import (
    build_accelerator,
    check_supported,
    configure_wrapping,
    gather_optimizer_state,
    is_fsdp,
    load_full_optimizer_state,
)
from halos_core.sharded import (
    describe as describe_sharding,
)
from halos_core.training.forward import ForwardPass
from halos_core.training.loop import RoundPosition, Trainer, warmup_lambda

log = logging.getLogger("halos_core.training")


def build_trainer(config: RunConfig, *, accelerator: Any = None, keep_last: int = DEFAULT_KEEP_LAST) -> Trainer:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env, set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hp = config.hyperparams
    run_dir = RunDir(config.run_dir)
    loss = build_loss(config.loss, hp)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:
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
            accelerator.distributed_type,
            accelerator.num_processes,
            accelerator.state.backend,
            accelerator.device,
            accelerator.gradient_accumulation_steps,
        )
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
                f"resume_from {config.resume_from} belongs to job {ckpt.trainer_state.get('job_id')}, "
                f"not {config.job_id}"
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
    batcher = Batcher(encoder, loss.data_kind, kl_pairs=loss.spec.kl_pairs, control_tokens=loss.control_tokens)
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
            # kept on the CPU: the forward pass moves it to the device for the one pass that fills
            # the reference cache (or on a cache miss) and back off after, so the full unsharded
            # reference is never on the device while the policy (sharded under FSDP) trains
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
        if head.kind == "reward" and config.lora is None:
            freeze_unused_lm_head(policy)  # a reward model never runs the LM head (DDP needs every trained param used)

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
    optimizer = torch.optim.AdamW([p for _, p in trained], lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.adam_betas)
    if sharded:
        configure_wrapping(accelerator, policy)
    model, optimizer = accelerator.prepare(model, optimizer)
    if sharded:
        shards = describe_sharding(model)
        log.info(
            "FSDP2 rank %d: %d units, %d of %d parameter elements held locally",
            accelerator.process_index,
            shards["units"],
            shards["local_numel"],
            shards["numel"],
        )
    raw_optimizer = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(raw_optimizer, warmup_lambda(hp.warmup_steps))

    # ---- counters and state
    if config.resume_from:
        assert ckpt is not None
        ts = ckpt.trainer_state
        if (
            int(ts.get("total_steps", train_loader.total_steps)) != train_loader.total_steps
            or int(ts.get("batch_size", hp.batch_size)) != hp.batch_size
        ):
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
    align_schedule(scheduler, hp.lr, hp.weight_decay, position.step_offset + position.round_step, betas=hp.adam_betas)
    if record is not None:
        record.lr_at_start = scheduler.get_last_lr()[0]
    restored: RestoreRecord | None
    if config.resume_from:
        # a retry: report what the first attempt restored from init_from (kept in the checkpoint's
        # trainer_state) as `restored`, and this attempt's restore point as `resumed`
        assert ckpt is not None
        earlier = ckpt.trainer_state.get("restored")
        restored, resumed = (RestoreRecord.model_validate(earlier) if earlier else None), record
    else:
        restored, resumed = record, None

    reference_cache = (
        ReferenceLogpCache(
            config.reference_cache_dir,
            config.reference_sha256 or reference_sha256,
            # rows computed with prefix sharing equal the unshared ones only within float tolerance:
            # kept apart, so a round without it reads exactly what the unshared path computes
            config.mixed_precision + ("-prefix-shared" if hp.prefix_sharing else ""),
        )
        if loss.needs_reference
        else None
    )
    forward = ForwardPass(
        accelerator=accelerator,
        model=model,
        reference=reference,
        lora=config.lora is not None,
        reference_cache=reference_cache,
        packing=hp.packing,
        pad_token_id=int(tokenizer.pad_token_id),
        prefix_sharing=hp.prefix_sharing,
    )
    return Trainer(
        config=config,
        accelerator=accelerator,
        model=model,
        forward=forward,
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
    )


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
    continue (`halos_core.compat`: the same rule the API applies at submit time)."""
    problem = incompatibility(recorded_params(ckpt.trainer_state), round_params(loss_name, config.lora))
    if problem is not None:
        raise CheckpointError(problem.message(f"checkpoint {ckpt.path}"))


def restore_record(
    source: Path | str, optimizer: Any, scheduler: Any, optimizer_state: dict[str, Any] | None = None
) -> RestoreRecord:
    """What was just restored, read back from the LIVE optimizer and scheduler (not the files):
    the digest of the optimizer's per-parameter state (`checkpoint.optimizer_state_digest`,
    comparable with the digest of the parent's optimizer.pt), its Adam step count and the
    scheduler's position. `lr_at_start` is added once this round's schedule is applied.
    `optimizer_state`: the live state gathered from the shards (FSDP; complete on rank 0 only)."""
    state = optimizer.state_dict() if optimizer_state is None else optimizer_state
    return RestoreRecord(
        source=str(source),
        optimizer_state_digest=optimizer_state_digest(state),
        optimizer_step=optimizer_step_count(state),
        scheduler_last_epoch=int(scheduler.last_epoch),
    )


def align_schedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    lr: float,
    weight_decay: float,
    global_step: int,
    betas: tuple[float, float] | None = None,
) -> None:
    """Key the schedule on the global step and apply this round's lr / weight decay / Adam betas.

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
        if betas is not None:
            group["betas"] = tuple(betas)
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
