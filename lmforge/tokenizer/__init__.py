"""Tokenizers: train, load and save (Hugging Face `tokenizers` engine), chat templates."""

from lmforge.tokenizer.chat import render_chat
from lmforge.tokenizer.stats import tokenizer_stats
from lmforge.tokenizer.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_tokenizer

__all__ = ["Tokenizer", "render_chat", "tokenizer_stats", "train_tokenizer"]
