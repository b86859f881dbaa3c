"""Causal LM packing, document positions and masks; seq2seq and classification padding."""

import numpy as np
import pytest
import torch

import lmforge
from lmforge.data.batchers import (
    IGNORE_INDEX,
    CausalLM,
    Seq2SeqPairs,
    SequenceClassification,
    TokenClassification,
)

EOS = 1


def test_causal_lm_labels_are_inputs_shifted_by_one():
    windows = [np.arange(10, 19), np.arange(40, 49)]  # seq_len 8 -> windows of 9
    assert CausalLM().window(8) == (9, 8)
    batch = CausalLM()(windows)
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == list(range(10, 18))
    assert batch["labels"][0].tolist() == list(range(11, 19))
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])


def test_document_positions_restart_at_each_eos():
    window = np.array([7, 8, EOS, 20, 21, 22, EOS, EOS, 30, 31])  # a doc tail, a doc, an empty doc, a doc head
    batch = CausalLM(eos_id=EOS, document_attention=True)([window])
    assert batch["input_ids"][0].tolist() == [7, 8, EOS, 20, 21, 22, EOS, EOS, 30]
    # The EOS that closes a document opens the next one, so every label is predicted from its own document.
    assert batch["document_ids"][0].tolist() == [0, 0, 1, 1, 1, 1, 2, 3, 3]
    assert batch["positions"][0].tolist() == [0, 1, 0, 1, 2, 3, 0, 0, 1]

    # The model turns them into block-diagonal causal attention: equal to running the documents apart.
    model = lmforge.build_model(lmforge.ModelConfig.from_preset("debug-llama", vocab_size=64), seed=0).eval()
    with torch.no_grad():
        packed = model(batch["input_ids"], positions=batch["positions"], document_ids=batch["document_ids"]).logits
        apart = model(batch["input_ids"][:, 2:6]).logits
    assert (packed[:, 2:6] - apart).abs().max() < 1e-5


def test_causal_lm_pads_documents_of_different_lengths():
    batch = CausalLM(pad_id=0)([np.array([5, 6, 7, EOS]), np.array([8, EOS])])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, EOS, 0]]
    assert batch["labels"].tolist() == [[6, 7, EOS], [EOS, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_causal_lm_errors_name_the_fix():
    with pytest.raises(ValueError, match="needs eos_id"):
        CausalLM(document_attention=True)
    with pytest.raises(ValueError, match="pass pad_id"):
        CausalLM()([np.arange(4), np.arange(3)])
    with pytest.raises(ValueError, match="seq_len=0"):
        CausalLM().window(0)


def test_seq2seq_pairs_pad_and_shift():
    batcher = Seq2SeqPairs(pad_id=0, decoder_start_id=2, eos_id=EOS)
    batch = batcher([([10, 11, 12], [20, 21]), ([13], [22, 23, 24, EOS])])
    assert batch["input_ids"].tolist() == [[10, 11, 12, EOS], [13, EOS, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[20, 21, EOS, -100], [22, 23, 24, EOS]]  # EOS appended, never doubled
    assert batch["decoder_input_ids"].tolist() == [[2, 20, 21, EOS], [2, 22, 23, 24]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_seq2seq_truncation_keeps_eos():
    batch = Seq2SeqPairs(pad_id=0, decoder_start_id=0, eos_id=EOS, max_source_len=3, max_target_len=2)(
        [(list(range(10, 20)), list(range(20, 30)))]
    )
    assert batch["input_ids"].tolist() == [[10, 11, EOS]]
    assert batch["labels"].tolist() == [[20, EOS]]


def test_sequence_classification_batch():
    batch = SequenceClassification(pad_id=0, max_len=3)([([5, 6], 1), ([7, 8, 9, 10], 0)])
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [1, 0]


def test_token_classification_ignores_padding_and_special_tokens():
    CLS, SEP = 3, 4
    batcher = TokenClassification(pad_id=0, special_ids=[CLS, SEP])
    batch = batcher([([CLS, 10, 11, SEP], [0, 2, 1, 0]), ([CLS, 12, SEP], [5, 3, 5])])
    assert batch["input_ids"].tolist() == [[CLS, 10, 11, SEP], [CLS, 12, SEP, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 1, -100], [-100, 3, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    with pytest.raises(ValueError, match="pair 0 has 2 tokens but 1 labels"):
        batcher([([10, 11], [0])])
