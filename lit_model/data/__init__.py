"""Training data: records on disk and conversations (records.py), tokenized samples (sft.py), the sample order
(batches.py), and the offline task sets (demo_tasks.py, sentence_tasks.py)."""

from lit_model.data.batches import BatchIterator
from lit_model.data.records import (
    Conversation,
    Message,
    alpaca_to_messages,
    load_conversations,
    load_records,
    split_records,
)
from lit_model.data.sft import IGNORE_INDEX, SFTDataset, collate

__all__ = ["IGNORE_INDEX", "BatchIterator", "Conversation", "Message", "SFTDataset", "alpaca_to_messages", "collate",
           "load_conversations", "load_records", "split_records"]
