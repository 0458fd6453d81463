"""Record formats: detect which one a parsed JSON object is, and turn it into the normal form.

Accepted (one format and one kind per file; unknown extra fields are ignored):

| format family        | recognised by                                | kind      |
|----------------------|----------------------------------------------|-----------|
| HALOs feedback       | `type`: binary_feedback / pairwise_feedback / scalar_feedback | binary / pairwise / scalar |
| HALOs sampled output | `type: "sample"`, or no `type` and a `sample_id` | sampled |
| TRL preference       | `chosen` / `rejected` (+ `prompt`)           | pairwise (label 1: chosen is output_A) |
| TRL unpaired         | `completion` (+ `prompt`, bool `label`)      | binary    |
| OpenAI preference    | `preferred_output` / `non_preferred_output` (+ `input.messages`) | pairwise |

Field rules: a prompt or output is a non-empty list of turns `{"role", "content"}` or a plain
string (prompt -> one `user` turn, output -> one `assistant` turn); `content` is a string (an
OpenAI-style list of `{"type": "text", "text"}` parts is joined); roles are the chat roles in
`ROLES`. Labels are exactly 0 or 1 (`true`/`false` also for TRL unpaired, where they are native);
rewards are finite numbers; `split` is "train" (default) or "test"; `prompt_id` is a string or an
integer (HALOs sampled outputs require it; elsewhere a missing id is derived from the prompt's
content, so identical prompts share one id).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from .records import BinaryRecord, FeedbackRecord, PairwiseRecord, RecordError, SampledRecord, ScalarRecord, Turn

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "ipython"})
HALOS_TYPES = {"binary_feedback": "binary", "pairwise_feedback": "pairwise", "scalar_feedback": "scalar"}
SAMPLE_TYPE = "sample"

# family -> kind for the families whose kind does not depend on the record
FAMILY_KIND = {
    "halos_sampled": "sampled",
    "trl_preference": "pairwise",
    "trl_unpaired": "binary",
    "openai_preference": "pairwise",
}

FORMATS_HINT = (
    'accepted: HALOs records with a "type" (binary_feedback, pairwise_feedback, scalar_feedback); HALOs sampled '
    "outputs (prompt_id, sample_id, prompt, output); TRL preference (prompt, chosen, rejected); TRL unpaired "
    "(prompt, completion, label); OpenAI preference (input.messages, preferred_output, non_preferred_output)"
)

# the fields each family knows: a record sharing none of them is reported as unknown_format
FAMILY_FIELDS = {
    "halos": frozenset(
        {"type", "prompt_id", "prompt", "output", "output_A", "output_B", "label", "reward", "reward_A", "reward_B"}
    ),
    "halos_sampled": frozenset({"type", "prompt_id", "sample_id", "prompt", "instruction", "output"}),
    "trl_preference": frozenset({"prompt", "chosen", "rejected"}),
    "trl_unpaired": frozenset({"prompt", "completion", "label"}),
    "openai_preference": frozenset({"input", "preferred_output", "non_preferred_output"}),
}

_MISSING = object()


def detect(obj: dict[str, Any]) -> tuple[str, str] | None:
    """(family, kind) of one record, or None when it matches no format."""
    if "type" in obj:
        t = obj["type"]
        if isinstance(t, str):
            if t in HALOS_TYPES:
                return "halos", HALOS_TYPES[t]
            if t == SAMPLE_TYPE:
                return "halos_sampled", "sampled"
        return None
    if "preferred_output" in obj or "non_preferred_output" in obj:
        return "openai_preference", "pairwise"
    if "chosen" in obj or "rejected" in obj:
        return "trl_preference", "pairwise"
    if "completion" in obj:
        return "trl_unpaired", "binary"
    if "sample_id" in obj:
        return "halos_sampled", "sampled"
    return None


def _short(value: Any, n: int = 40) -> str:
    text = value if isinstance(value, str) else _type_name(value)
    return repr(text if len(text) <= n else text[:n] + "...")


def unknown_format_error(obj: dict[str, Any], index: int, line: int | None) -> RecordError:
    """The error for a record whose format cannot be recognised, with the most useful hint."""
    if "type" in obj:
        return RecordError(
            index=index,
            line=line,
            field="type",
            code="unknown_format",
            message=f"unknown record type {_short(obj['type'])}",
            hint='HALOs "type" must be binary_feedback, pairwise_feedback, scalar_feedback or sample',
        )
    guess = None
    if "output_A" in obj or "output_B" in obj:
        guess = "pairwise_feedback"
    elif "output" in obj and "label" in obj:
        guess = "binary_feedback"
    elif "output" in obj and "reward" in obj:
        guess = "scalar_feedback"
    if guess:
        hint = f'this looks like HALOs feedback without its type: add "type": "{guess}" to every record'
    elif "messages" in obj or "conversations" in obj:
        hint = "chat transcripts are not feedback; " + FORMATS_HINT
    else:
        hint = FORMATS_HINT
    keys = ", ".join(_short(k, 30) for k in sorted(obj)[:8]) + (", ..." if len(obj) > 8 else "") or "none"
    return RecordError(
        index=index,
        line=line,
        field="",
        code="unknown_format",
        message=f"record matches no feedback format (its keys: {keys})",
        hint=hint,
    )


def prompt_digest(prompt: list[Turn]) -> bytes:
    canon = json.dumps([[t.role, t.content] for t in prompt], ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canon.encode("utf-8", "surrogatepass"), digest_size=12).digest()


def derived_prompt_id(prompt: list[Turn]) -> str:
    return "h-" + prompt_digest(prompt).hex()


# --------------------------------------------------------------------------- field checks


class _Ctx:
    """Collects the errors of one record."""

    def __init__(self, index: int, line: int | None):
        self.index = index
        self.line = line
        self.errors: list[RecordError] = []

    def err(self, field: str, code: str, message: str, hint: str) -> None:
        self.errors.append(
            RecordError(index=self.index, line=self.line, field=field, code=code, message=message, hint=hint)
        )

    def require(self, obj: dict[str, Any], key: str, hint: str | None = None, prefix: str = "") -> Any:
        if key not in obj:
            self.err(
                prefix + key,
                "missing_field",
                f"missing required field {key!r}",
                hint or f"add the {key!r} field to every record",
            )
            return _MISSING
        return obj[key]


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _content(ctx: _Ctx, value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI-style content parts
        texts = []
        for j, part in enumerate(value):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                ctx.err(
                    f"{path}[{j}]",
                    "wrong_type",
                    'only text content parts ({"type": "text", "text": ...}) are supported',
                    'put the text in a string "content"',
                )
                return None
        return "".join(texts)
    ctx.err(
        path, "wrong_type", f"content must be a string, got {_type_name(value)}", 'every turn needs a string "content"'
    )
    return None


def _turns(ctx: _Ctx, value: Any, path: str, default_role: str) -> list[Turn] | None:
    """A list of turns, or a plain string as one turn with `default_role`."""
    if isinstance(value, str):
        return [Turn.model_construct(role=default_role, content=value)]
    if not isinstance(value, list):
        ctx.err(
            path,
            "wrong_type",
            f"must be a list of turns or a string, got {_type_name(value)}",
            'use [{"role": "' + default_role + '", "content": "..."}] or a plain string',
        )
        return None
    if not value:
        ctx.err(
            path,
            "empty_value",
            "must contain at least one turn",
            'give at least one {"role": ..., "content": ...} turn, or a plain string',
        )
        return None
    turns: list[Turn] = []
    ok = True
    for j, turn in enumerate(value):
        tpath = f"{path}[{j}]"
        if not isinstance(turn, dict):
            ctx.err(
                tpath,
                "wrong_type",
                f"a turn must be an object, got {_type_name(turn)}",
                'use {"role": ..., "content": ...}',
            )
            ok = False
            continue
        role = turn.get("role", _MISSING)
        if role is _MISSING:
            hint = (
                "ShareGPT-style turns (from/value) must be converted to role/content"
                if "from" in turn
                else 'every turn needs a "role" (e.g. user, assistant)'
            )
            ctx.err(tpath + ".role", "missing_field", "missing required field 'role'", hint)
            ok = False
        elif not isinstance(role, str):
            ctx.err(
                tpath + ".role",
                "wrong_type",
                f"role must be a string, got {_type_name(role)}",
                'use a string role such as "user" or "assistant"',
            )
            ok = False
        elif role not in ROLES:
            ctx.err(
                tpath + ".role", "invalid_role", f"unknown role {_short(role)}", "roles: " + ", ".join(sorted(ROLES))
            )
            ok = False
        if "content" not in turn:
            ctx.err(
                tpath + ".content",
                "missing_field",
                "missing required field 'content'",
                'every turn needs a string "content"',
            )
            ok = False
            continue
        content = _content(ctx, turn["content"], tpath + ".content")
        if content is None:
            ok = False
            continue
        if ok:
            turns.append(Turn.model_construct(role=role, content=content))
    return turns if ok else None


def _label(ctx: _Ctx, value: Any, path: str, allow_bool: bool, hint: str) -> int | None:
    if isinstance(value, bool):
        if allow_bool:
            return int(value)
        ctx.err(path, "invalid_label", f"label must be 0 or 1, got {json.dumps(value)}", hint)
        return None
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    shown = json.dumps(value) if isinstance(value, (int, float, str)) or value is None else _type_name(value)
    ctx.err(
        path, "invalid_label", f"label must be {'true/false or ' if allow_bool else ''}0 or 1, got {shown[:40]}", hint
    )
    return None


def _reward(ctx: _Ctx, value: Any, path: str, required: bool) -> float | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ctx.err(
            path,
            "wrong_type",
            f"reward must be a number, got {_type_name(value)}",
            "use a plain JSON number" + ("" if required else " (or leave it out)"),
        )
        return None
    try:
        reward = float(value)
    except OverflowError:  # an integer too large for a float
        reward = math.inf
    if not math.isfinite(reward):
        ctx.err(
            path,
            "invalid_reward",
            f"reward must be a finite number, got {value}",
            "replace NaN/Infinity rewards, or drop the record",
        )
        return None
    return reward


def _split(ctx: _Ctx, obj: dict[str, Any]) -> str:
    value = obj.get("split")
    if value is None:
        return "train"
    if value in ("train", "test"):
        return value
    shown = json.dumps(value)[:40] if isinstance(value, (str, int, float)) else _type_name(value)
    ctx.err(
        "split",
        "invalid_split",
        f'split must be "train" or "test", got {shown}',
        'use "train" or "test", or leave it out (train)',
    )
    return "train"


def _id(ctx: _Ctx, obj: dict[str, Any], key: str, required: bool, hint: str | None = None) -> str | None:
    if key not in obj or (obj[key] is None and not required):
        if required:
            ctx.err(key, "missing_field", f"missing required field {key!r}", hint or f"add the {key!r} field")
        return None
    value = obj[key]
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    ctx.err(
        key,
        "wrong_type",
        f"{key} must be a non-empty string or an integer, got {'empty string' if value == '' else _type_name(value)}",
        "use a string or an integer id" + ("" if required else ", or leave it out"),
    )
    return None


# --------------------------------------------------------------------------- per family


def _halos(ctx: _Ctx, obj: dict[str, Any], kind: str) -> FeedbackRecord | None:
    type_name = {v: k for k, v in HALOS_TYPES.items()}[kind]
    t = obj.get("type", _MISSING)
    if t is _MISSING:
        ctx.err(
            "type",
            "missing_field",
            "missing required field 'type'",
            f'every record of this file needs "type": "{type_name}"',
        )
    elif t != type_name:  # another HALOs type is reported as mixed_kinds before we get here
        ctx.err("type", "unknown_format", f"unknown record type {_short(t)}", f'use "type": "{type_name}"')
    prompt_id = _id(ctx, obj, "prompt_id", required=False)
    prompt = _req_turns(ctx, obj, "prompt", "user")
    split = _split(ctx, obj)
    label_hint = "1 = desirable, 0 = undesirable" if kind == "binary" else "1 = output_A preferred, 0 = output_B"
    if kind == "binary":
        output = _req_turns(ctx, obj, "output", "assistant")
        label = _req_label(ctx, obj, "label", False, label_hint)
        reward = _reward(ctx, obj.get("reward"), "reward", required=False)
        if ctx.errors:
            return None
        return BinaryRecord.model_construct(
            prompt_id=prompt_id or derived_prompt_id(prompt),
            prompt=prompt,
            output=output,
            label=label,
            reward=reward,
            split=split,
        )
    if kind == "pairwise":
        out_a = _req_turns(ctx, obj, "output_A", "assistant")
        out_b = _req_turns(ctx, obj, "output_B", "assistant")
        label = _req_label(ctx, obj, "label", False, label_hint)
        reward_a = _reward(ctx, obj.get("reward_A"), "reward_A", required=False)
        reward_b = _reward(ctx, obj.get("reward_B"), "reward_B", required=False)
        if ctx.errors:
            return None
        return PairwiseRecord.model_construct(
            prompt_id=prompt_id or derived_prompt_id(prompt),
            prompt=prompt,
            output_A=out_a,
            output_B=out_b,
            label=label,
            reward_A=reward_a,
            reward_B=reward_b,
            split=split,
        )
    output = _req_turns(ctx, obj, "output", "assistant")
    reward_v = ctx.require(obj, "reward", 'scalar feedback needs a numeric "reward"')
    reward = None if reward_v is _MISSING else _reward(ctx, reward_v, "reward", required=True)
    if ctx.errors:
        return None
    return ScalarRecord.model_construct(
        prompt_id=prompt_id or derived_prompt_id(prompt), prompt=prompt, output=output, reward=reward, split=split
    )


def _req_turns(
    ctx: _Ctx, obj: dict[str, Any], key: str, default_role: str, hint: str | None = None, prefix: str = ""
) -> list[Turn] | None:
    value = ctx.require(obj, key, hint, prefix)
    if value is _MISSING:
        return None
    return _turns(ctx, value, prefix + key, default_role)


def _req_label(ctx: _Ctx, obj: dict[str, Any], key: str, allow_bool: bool, hint: str) -> int | None:
    value = ctx.require(obj, key, hint)
    if value is _MISSING:
        return None
    return _label(ctx, value, key, allow_bool, hint)


def _sampled(ctx: _Ctx, obj: dict[str, Any]) -> SampledRecord | None:
    if "type" in obj and obj["type"] != SAMPLE_TYPE:
        ctx.err(
            "type",
            "unknown_format",
            f"unknown record type {_short(obj['type'])}",
            'sampled outputs have "type": "sample" or no type',
        )
    prompt_id = _id(ctx, obj, "prompt_id", required=True, hint="sampled outputs need the prompt_id they came from")
    sample_id = _id(ctx, obj, "sample_id", required=True, hint="sampled outputs need a sample_id (0..k-1 per prompt)")
    if "prompt" not in obj and "instruction" in obj:  # HALOs sample.py --alpacaeval writes the instruction only
        prompt = _turns(ctx, obj["instruction"], "instruction", "user")
    else:
        prompt = _req_turns(ctx, obj, "prompt", "user")
    output = _req_turns(ctx, obj, "output", "assistant")
    dataset = obj.get("dataset")
    if dataset is None:
        dataset = ""
    elif not isinstance(dataset, str):
        ctx.err(
            "dataset",
            "wrong_type",
            f"dataset must be a string, got {_type_name(dataset)}",
            "use a string dataset name, or leave it out",
        )
    split = _split(ctx, obj)
    if ctx.errors:
        return None
    return SampledRecord.model_construct(
        prompt_id=prompt_id, sample_id=sample_id, prompt=prompt, output=output, dataset=dataset, split=split
    )


def _trl_preference(ctx: _Ctx, obj: dict[str, Any]) -> PairwiseRecord | None:
    prompt = _req_turns(
        ctx,
        obj,
        "prompt",
        "user",
        'TRL files with an implicit prompt (prompt inside chosen/rejected) need an explicit "prompt"',
    )
    chosen = _req_turns(ctx, obj, "chosen", "assistant")
    rejected = _req_turns(ctx, obj, "rejected", "assistant")
    prompt_id = _id(ctx, obj, "prompt_id", required=False)
    reward_a = _reward(ctx, obj.get("score_chosen"), "score_chosen", required=False)
    reward_b = _reward(ctx, obj.get("score_rejected"), "score_rejected", required=False)
    split = _split(ctx, obj)
    if ctx.errors:
        return None
    return PairwiseRecord.model_construct(
        prompt_id=prompt_id or derived_prompt_id(prompt),
        prompt=prompt,
        output_A=chosen,
        output_B=rejected,
        label=1,
        reward_A=reward_a,
        reward_B=reward_b,
        split=split,
    )


def _trl_unpaired(ctx: _Ctx, obj: dict[str, Any]) -> BinaryRecord | None:
    prompt = _req_turns(ctx, obj, "prompt", "user")
    completion = _req_turns(ctx, obj, "completion", "assistant")
    label = _req_label(ctx, obj, "label", True, "true = desirable, false = undesirable")
    prompt_id = _id(ctx, obj, "prompt_id", required=False)
    split = _split(ctx, obj)
    if ctx.errors:
        return None
    return BinaryRecord.model_construct(
        prompt_id=prompt_id or derived_prompt_id(prompt),
        prompt=prompt,
        output=completion,
        label=label,
        reward=None,
        split=split,
    )


def _openai_preference(ctx: _Ctx, obj: dict[str, Any]) -> PairwiseRecord | None:
    prompt = None
    inp = ctx.require(obj, "input", 'OpenAI preference records need {"input": {"messages": [...]}}')
    if inp is not _MISSING:
        if not isinstance(inp, dict):
            ctx.err(
                "input",
                "wrong_type",
                f"input must be an object, got {_type_name(inp)}",
                'use {"input": {"messages": [...]}}',
            )
        else:
            prompt = _req_turns(ctx, inp, "messages", "user", prefix="input.")
    preferred = _req_turns(ctx, obj, "preferred_output", "assistant")
    non_preferred = _req_turns(ctx, obj, "non_preferred_output", "assistant")
    prompt_id = _id(ctx, obj, "prompt_id", required=False)
    split = _split(ctx, obj)
    if ctx.errors:
        return None
    return PairwiseRecord.model_construct(
        prompt_id=prompt_id or derived_prompt_id(prompt),
        prompt=prompt,
        output_A=preferred,
        output_B=non_preferred,
        label=1,
        reward_A=None,
        reward_B=None,
        split=split,
    )


def parse_record(
    obj: dict[str, Any], family: str, kind: str, index: int, line: int | None
) -> tuple[FeedbackRecord | None, list[RecordError]]:
    """The normal-form record for `obj` read as `family`, or the list of everything wrong with it."""
    ctx = _Ctx(index, line)
    if family == "halos":
        record = _halos(ctx, obj, kind)
    elif family == "halos_sampled":
        record = _sampled(ctx, obj)
    elif family == "trl_preference":
        record = _trl_preference(ctx, obj)
    elif family == "trl_unpaired":
        record = _trl_unpaired(ctx, obj)
    elif family == "openai_preference":
        record = _openai_preference(ctx, obj)
    else:  # pragma: no cover - families come from detect()
        raise ValueError(f"unknown family {family!r}")
    return (None, ctx.errors) if ctx.errors else (record, [])
