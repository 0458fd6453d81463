"""Request bodies from the keyword arguments of the client's methods (and the CLI's options).

Only the arguments given are set on the model, so `model_dump(exclude_unset=True)` sends exactly
those: the server then applies its own defaults and the run's values, as documented per field.
Validated here with the API's own models, so a typo fails before anything is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from halos_client import models as m


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # "not given" where None means something (a round's conversion: None = none)


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json", exclude_unset=True) if isinstance(value, BaseModel) else value


def loss_value(loss: Any) -> Any:
    """`"dpo"` is shorthand for `{"name": "dpo"}` (the loss with its default parameters)."""
    return {"name": loss} if isinstance(loss, str) else _plain(loss)


def run_body(
    model_id: str,
    loss: Any,
    *,
    name: str | None = None,
    hyperparams: Any = None,
    conversion: Any = None,
    lora: Any = None,
) -> m.RunCreate:
    fields: dict[str, Any] = {"model_id": model_id, "loss": loss_value(loss)}
    for key, value in (("name", name), ("hyperparams", hyperparams), ("conversion", conversion), ("lora", lora)):
        if value is not None:
            fields[key] = _plain(value)
    return m.RunCreate.model_validate(fields)


def round_body(
    feedback_ids: Sequence[str],
    *,
    loss: Any = None,
    hyperparams: Any = None,
    conversion: Any = UNSET,
    parent_checkpoint_id: str | None = None,
) -> m.RoundCreate:
    if isinstance(feedback_ids, str):
        raise TypeError("feedback_ids is a list of ids, not one string")
    fields: dict[str, Any] = {"feedback_ids": list(feedback_ids)}
    if loss is not None:
        fields["loss"] = loss_value(loss)
    if hyperparams is not None:
        fields["hyperparams"] = _plain(hyperparams)
    if conversion is not UNSET:
        fields["conversion"] = _plain(conversion)
    if parent_checkpoint_id is not None:
        fields["parent_checkpoint_id"] = parent_checkpoint_id
    return m.RoundCreate.model_validate(fields)
