"""Pruning by linearity: score blocks, remove them or replace them by fitted linear maps, distill.

``linreg prune`` (``linreg.pruning.cli``) is the command line; see ``docs/analyze_and_prune.md``.
"""

from linreg.pruning.linear_block import LinearBlock
from linreg.pruning.surgery import load_pruned, load_tokenizer, remove_blocks, replace_blocks, save_pruned

__all__ = ["LinearBlock", "load_pruned", "load_tokenizer", "remove_blocks", "replace_blocks", "save_pruned"]
