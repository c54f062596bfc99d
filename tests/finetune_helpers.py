"""Helpers for the fine-tuning tests: local JSONL files, a small tokenizer trained with `tokenizers`, and
the real entry point `launch/finetune.py` in a subprocess."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.train_helpers import REPO, env_for, free_port

FINETUNE = REPO / "launch" / "finetune.py"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_tokenizer(texts: list[str], out: Path, vocab_size: int = 400, pad: bool = True) -> Path:
    """A byte-level BPE trained with `tokenizers` on ``texts``, saved as a Hugging Face tokenizer folder.
    ``pad=False`` leaves out the pad token (the objectives then pad with EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad else [])
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    kw = {"pad_token": "<pad>"} if pad else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **kw)
    tok.save_pretrained(str(out))
    return out


def run_finetune(args: list[str], cache: Path, *, ranks: int = 1, env: dict | None = None, check: bool = True,
                 timeout: int = 600) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, str(FINETUNE), *args]
    else:
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(FINETUNE), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env_for(cache, env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fine-tuning failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def sets(*pairs: str) -> list[str]:
    out = []
    for p in pairs:
        out += ["--set", p]
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
