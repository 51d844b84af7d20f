"""A toy language model with LoRA, and trainer settings, shared by the training tests
(and by the torchrun worker script, which imports this file)."""

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from minilora import LoraConfig, inject

VOCAB = 23


@dataclass
class Out:
    logits: torch.Tensor


class ToyLM(nn.Module):
    """Embedding, a mixing layer, a head: enough for LoRA to have something to adapt."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.mix = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.0)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = h + torch.tanh(self.mix(self.drop(h))).cumsum(1) / torch.arange(1, h.size(1) + 1)[:, None]
        return Out(self.head(h))


def toy_model(dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    model = ToyLM().to(dtype)
    inject(model, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=["mix", "head"]))
    with torch.no_grad():  # a non-zero B, so the first step already moves everything
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def lm_examples(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        labels = list(ids)
        cut = int(torch.randint(0, length - 1, (1,), generator=g))
        labels[:cut] = [-100] * cut  # a prompt part with no loss, of varying length
        out.append({"input_ids": ids, "labels": labels})
    return out


def args(**kw):
    base = dict(epochs=1, max_steps=None, batch_size=4, grad_accum=1, lr=1e-2, weight_decay=0.0, warmup_steps=0,
                warmup_ratio=0.0, schedule="constant", min_lr_ratio=0.0, max_grad_norm=0.0, seed=0,
                eval_every=None, save_every=None, early_stopping_patience=None, early_stopping_min_delta=0.0,
                metric_for_best="auto", log_every=1, resume_from=None, device="cpu", precision="fp32")
    base.update(kw)
    return SimpleNamespace(**base)


def adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


