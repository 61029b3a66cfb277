"""lit_model: a self-contained GPT/Llama with DropBP. Importing it needs torch only."""

from lit_model.config import Config
from lit_model.model import GPT, Block

__all__ = ["GPT", "Block", "Config"]
