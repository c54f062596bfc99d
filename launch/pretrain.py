"""Pretraining entry point: ``deepspeed launch/pretrain.py --recipe recipes/tiny.yaml [--set k=v ...]``.

Run with ``--help`` for every option. The loop itself lives in ``linreg.train``.
"""

import sys

from linreg.train.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="launch/pretrain.py", default_kind="lm"))
