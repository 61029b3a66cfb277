"""Training data: the record formats and conversations (formats.py), files and datasets on disk (records.py),
tokenized samples (sft.py), the sample order (batches.py), and the offline task sets (demo_tasks.py,
sentence_tasks.py)."""

from lit_model.data.batches import BatchIterator
from lit_model.data.formats import FORMAT_CHOICES, FORMATS, SHAREGPT_ROLES, detect_format, to_conversation
from lit_model.data.records import (
    Conversation,
    Message,
    alpaca_to_messages,
    load_conversations,
    load_dataset_conversations,
    load_records,
    split_records,
)
from lit_model.data.sft import IGNORE_INDEX, SFTDataset, collate

__all__ = ["FORMATS", "FORMAT_CHOICES", "IGNORE_INDEX", "SHAREGPT_ROLES", "BatchIterator", "Conversation", "Message",
           "SFTDataset", "alpaca_to_messages", "collate", "detect_format", "load_conversations",
           "load_dataset_conversations", "load_records", "split_records", "to_conversation"]
