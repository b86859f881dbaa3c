"""Tokenizers: train, load and save (Hugging Face `tokenizers` engine), chat templates."""

from lmforge.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
