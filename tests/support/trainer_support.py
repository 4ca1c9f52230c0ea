"""Models and data for the trainer integration tests: a tiny GPT-2 with LoRA, token batches,
float64 references.

The model is built from a config (random weights, nothing downloaded) and small enough
that a few Trainer steps take well under a second on two CPU cores.
"""

from __future__ import annotations

import pytest
import torch

VOCAB = 97
SEQ = 16


def tiny_gpt2(seed: int = 0, **config):
    """GPT-2 from a config (random weights seeded with ``seed``, nothing downloaded), its
    embeddings tied as GPT-2 ships: 2 layers, 32 wide, vocabulary ``VOCAB``, ``SEQ``
    positions, unless ``config`` says otherwise."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    shape = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ)
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**{**shape, **config}, bos_token_id=0, eos_token_id=0)
    )


def tiny_lora_gpt2(seed: int = 0, target_modules=("c_attn",)):
    """``tiny_gpt2`` with LoRA r=4 on ``target_modules``."""
    peft = pytest.importorskip("peft")
    base = tiny_gpt2(seed)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(target_modules),
        fan_in_fan_out=True,
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    return peft.get_peft_model(base, lora)


def token_batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` examples of random token ids, each its own label (a causal LM target)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def sq64(params) -> float | None:
    """Sum of squared gradient entries in float64 (None when no parameter has a gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return float(sum(g.detach().to("cpu", torch.float64).pow(2).sum() for g in grads))
