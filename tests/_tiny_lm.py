"""A dependency-free tiny causal LM (torch only) for spawned multi-process tests.

Spawned workers re-import the module that defines them; importing transformers there costs several
seconds per process on a loaded 2-core machine, so distributed tests use this model instead.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


class Block(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, 2 * d)
        self.down = torch.nn.Linear(2 * d, d)

    def forward(self, h, attention_mask=None):
        return h + self.down(torch.tanh(self.up(self.norm(h))))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 64, d: int = 16, n_layers: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = SimpleNamespace(num_hidden_layers=n_layers, hidden_size=d, vocab_size=vocab)
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList([Block(d) for _ in range(n_layers)])
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h, attention_mask=attention_mask)
        return self.head(self.norm(h))


def ids(b: int, t: int, seed: int = 0, vocab: int = 64) -> torch.Tensor:
    return torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def measure_worker(rank: int, init_file: str, out_file: str) -> None:
    """Rank 0 measures two batches, rank 1 none; both call measure_model(distributed=True)."""
    import torch.distributed as dist

    from linreg.hidden import measure_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = TinyLM()
        batches = [{"input_ids": ids(2, 20, seed=1)}, {"input_ids": ids(3, 8, seed=2)}] if rank == 0 else []
        res = measure_model(model, batches, distributed=True)
        if rank == 1:
            torch.save(res.to_dict(), out_file)
    finally:
        dist.destroy_process_group()
