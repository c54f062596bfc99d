"""Distillation entry point: ``deepspeed launch/distill.py --recipe recipes/distill-tiny.yaml [--set k=v ...]``.

Trains the linear replacements of a pruned model (``linreg prune --replace linear``) against the original
model's hidden states, through the same loop as pretraining (``linreg.train``). The objective is
``linreg.pruning.distill.DistillObjective``; run with ``--help`` for every option.
"""

import sys

from linreg.train.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="launch/distill.py", default_kind="distill"))
