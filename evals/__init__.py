"""Evaluations of the paper "Your Transformer is Secretly Linear" (Razzhigaev et al., 2024).

One module per evaluation, each with ``main(argv) -> int`` (dispatched by ``linreg SUB``):

- :mod:`evals.linear_probe` (``linreg probe``): logistic-regression probes on every layer.
- :mod:`evals.judge` (``linreg judge``): TinyStories-style grading of completions by an
  OpenAI-compatible model.
- :mod:`evals.superglue` (``linreg superglue``): SuperGLUE zero-shot through lm-evaluation-harness.
- :mod:`evals.compare` (``linreg compare``): several result files -> one side-by-side table.

Shared helpers live in :mod:`evals.common`; :mod:`evals.loopback` is an OpenAI-compatible grading
server on 127.0.0.1 for tests, benchmarks and offline dry runs. Heavy libraries (torch,
transformers, lm-eval, openai) are imported inside the functions that need them.
"""

RESULT_FORMAT_VERSION = 1
