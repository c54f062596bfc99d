"""Fine-tuning dynamics: linearity before, during and after task fine-tuning and reward modelling.

``tasks`` reads the data (SuperGLUE MultiRC/BoolQ/CB, Anthropic HH helpful pairs, any JSONL),
``objectives`` holds the ``classification`` and ``reward`` objectives of the training loop, ``sweep`` runs
several seeds in one command (``deepspeed launch/finetune.py --recipe R --seeds 1,2,3``) and ``table``
builds the linearity-change table (``linreg finetune-table``). See docs/finetune.md.
"""
