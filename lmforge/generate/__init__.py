"""Generation: token ids in, new token ids (and text) out: KV-cached prefill + decode, sampling, stops.

    new_ids = generate(model, input_ids, max_new_tokens=32, temperature=0.0)
    for step in stream(model, input_ids, max_new_tokens=32, tokenizer=tok, stop_strings=["\\n"]):
        print(step.text[0], end="", flush=True)

engine.py: `stream` (the one decoding loop, step by step) and `generate` (built on it); session.py: running
a model step by step (positions, masks, KV cache) for decoders and encoder-decoders; sampling.py: logits ->
next token (penalties, temperature, top-k, top-p, min-p, seeded sampling) and log-probabilities; text.py:
incremental detokenization and stop strings; commands.py: `lmforge generate` and `lmforge chat`.
"""

from lmforge.generate.engine import GenerationStep, generate, stream
from lmforge.generate.sampling import SamplingParams

__all__ = ["GenerationStep", "SamplingParams", "generate", "stream"]
