"""Data: the user's sources become validated conversations, split into train and eval.

source (file / saved dataset / hub id) --sources.read_records--> (line, record)
    --formats.to_messages--> [{role, content}, ...]   # alpaca, messages, ShareGPT, the tutorials' raw shapes
    --splits.read_splits--> train / eval conversations  # mixed, sampled, de-duplicated, split by seed
A bad row raises `DataError(path, line, reason)`, or with `on_bad_row: skip` is counted by reason.
"""

from chattune.data.formats import (
    CONVERTERS,
    HUANHUAN_SYSTEM,
    LEGAL_SYSTEM,
    NEWS_CLS_SYSTEM,
    ROLES,
    BadRow,
    Conversation,
    detect_format,
    to_messages,
    to_record,
    validate_messages,
)
from chattune.data.sources import Source, read_records
from chattune.data.splits import (
    ReadReport,
    check_sources,
    conversation_key,
    read_conversations,
    read_splits,
    sample_conversations,
    split_conversations,
)

__all__ = [
    "CONVERTERS",
    "HUANHUAN_SYSTEM",
    "LEGAL_SYSTEM",
    "NEWS_CLS_SYSTEM",
    "ROLES",
    "Conversation",
    "ReadReport",
    "Source",
    "BadRow",
    "check_sources",
    "conversation_key",
    "detect_format",
    "read_conversations",
    "read_records",
    "read_splits",
    "sample_conversations",
    "split_conversations",
    "to_messages",
    "to_record",
    "validate_messages",
]
