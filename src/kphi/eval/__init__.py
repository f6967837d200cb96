"""Evaluation: bits per byte and perplexity of any causal LM on held-out text (:mod:`.evaluate`), and
lm-evaluation-harness tasks run through its Python API (:mod:`.harness`)."""
