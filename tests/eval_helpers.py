"""Tiny causal LMs and tokenizers for the evals/ tests (built from configs, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Once upon a time there was a little dog named Tom. Tom liked to run in the park.",
    "The cat sat on the mat and looked at the big red ball. She was very happy.",
    "Lily and Ben went to the beach. They built a castle of sand and ate ice cream.",
    "Question: Is the answer correct? yes no True False Neither because therefore",
    "Sentence 1: The bank of the river. Sentence 2: The bank gave me money. Answer: yes",
    "0123456789 @placeholder @highlight - , . ! ? ' \" ( ) : ;",
]


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a few sentences (every byte is representable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_lm(out_dir: str | Path, *, arch: str = "mistral", layers: int = 2, hidden: int = 32,
                  seed: int = 0) -> Path:
    """Save a tiny randomly initialised causal LM plus its tokenizer to ``out_dir``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "mistral":
        cfg = MistralConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=1024, **ids)
        model = MistralForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=4, n_positions=1024, **ids)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
