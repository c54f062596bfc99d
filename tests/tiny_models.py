"""Tiny Hugging Face causal LMs built from configs, a tokenizer trained in the test, and text files, for the
analyze / prune / distill tests (no hub, no internet)."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINYSTORIES = REPO.parent / "shared" / "data" / "tinystories-sample.txt"
VOCAB = 320


def story_text(n_docs: int = 300, seed: int = 0) -> str:
    """Synthetic stories (linreg's embedded generator), paragraphs separated by blank lines."""
    from linreg.data import synthetic_stories

    return "\n\n".join(s.replace("\n\n", "\n") for s in synthetic_stories(n_docs, seed)) + "\n"


def write_text(path: Path, n_docs: int = 300, seed: int = 0) -> Path:
    path.write_text(story_text(n_docs, seed))
    return path


def train_tokenizer(texts, vocab_size: int = VOCAB):
    """Byte-level BPE trained with ``tokenizers`` in the test; unk/bos/eos/pad get ids 0..3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_model(arch: str, *, d: int = 32, layers: int = 4, vocab: int = VOCAB, seed: int = 0):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, OPTConfig, OPTForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=d, n_layer=layers, n_head=4, n_positions=256, **common)
        return GPT2LMHeadModel(cfg).eval()
    if arch == "opt":
        cfg = OPTConfig(hidden_size=d, ffn_dim=2 * d, num_hidden_layers=layers, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=d, **common)
        return OPTForCausalLM(cfg).eval()
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **common)
        return LlamaForCausalLM(cfg).eval()
    if arch == "mistral":
        cfg = MistralConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, **common)
        return MistralForCausalLM(cfg).eval()
    raise ValueError(arch)


def final_norm(model):
    """The final norm applied after the last block, per architecture."""
    for path in ("model.norm", "model.decoder.final_layer_norm", "transformer.ln_f"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    raise ValueError(type(model).__name__)


def save_model(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pack(tokenizer, text: str, seq_len: int):
    """All of ``text`` (paragraph documents, EOS after each) as [N, seq_len] int64 blocks."""
    import numpy as np

    ids: list[int] = []
    for doc in text.split("\n\n"):
        if doc.strip():
            ids.extend(tokenizer(doc.strip())["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def train_lm(model, blocks, steps: int = 150, batch: int = 8, lr: float = 3e-3, seed: int = 0):
    """A few AdamW steps of next-token training (in process), so that the model is better than chance."""
    import numpy as np

    g = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        idx = g.integers(0, len(blocks), size=batch)
        ids = torch.from_numpy(blocks[idx])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())
