"""Fine-tuning entry point: ``deepspeed launch/finetune.py --recipe recipes/finetune-boolq.yaml [--seeds 1,2,3]``.

Classification (SuperGLUE MultiRC/BoolQ/CB, any JSONL) or reward modelling (Anthropic HH helpful, any
JSONL of chosen/rejected pairs) through the training loop, with layer linearity tracked before, during
and after. Run with ``--help`` for every option; see docs/finetune.md.
"""

import sys

from linreg.finetune.sweep import main

if __name__ == "__main__":
    sys.exit(main(prog="launch/finetune.py"))
