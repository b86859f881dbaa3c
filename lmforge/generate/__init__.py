"""Generation: token ids in, new token ids out (KV-cached prefill + decode, sampling, stops).

    new_ids = generate(model, input_ids, max_new_tokens=32, temperature=0.0)

engine.py: `generate` and its loop; session.py: running a model step by step (positions, masks, KV
cache) for decoders and encoder-decoders; sampling.py: logits -> next token (penalties, temperature,
top-k, top-p, min-p, seeded sampling).
"""

from lmforge.generate.engine import generate
from lmforge.generate.sampling import SamplingParams

__all__ = ["SamplingParams", "generate"]
