"""Feedback files: formats, streaming validation, the normal form, and conversions (torch-free).

The server validates uploads with `validate_file` (one pass, bounded memory, every bad record
reported) and the trainer reads them with `read_records`; both see the same normal form.
"""

from .convert import apply_conversion, pairwise_to_unpaired, scalar_to_binary, scalar_to_pairs
from .reader import read_records, validate_file
from .records import (
    BinaryRecord,
    FeedbackFormat,
    FeedbackLimits,
    FeedbackRecord,
    FeedbackSummary,
    FeedbackValidationError,
    PairwiseRecord,
    RecordError,
    SampledRecord,
    ScalarRecord,
    Turn,
)

# Every `RecordError.code` validation can produce.
ERROR_CODES = frozenset(
    {
        # file level
        "empty_file",
        "unknown_format",
        "too_many_records",
        # bytes / JSON syntax of one record
        "invalid_utf8",
        "invalid_json",
        "too_deep",
        "record_too_large",
        "duplicate_key",
        # fields
        "missing_field",
        "wrong_type",
        "empty_value",
        "invalid_role",
        "invalid_label",
        "invalid_reward",
        "invalid_split",
        # across records
        "mixed_kinds",
        "mixed_formats",
        "conflicting_prompt",
        "conflicting_split",
    }
)

__all__ = [
    "Turn",
    "BinaryRecord",
    "PairwiseRecord",
    "ScalarRecord",
    "SampledRecord",
    "FeedbackRecord",
    "FeedbackFormat",
    "RecordError",
    "FeedbackValidationError",
    "FeedbackLimits",
    "FeedbackSummary",
    "ERROR_CODES",
    "validate_file",
    "read_records",
    "pairwise_to_unpaired",
    "scalar_to_binary",
    "scalar_to_pairs",
    "apply_conversion",
]
