"""Task metrics, computed from sufficient statistics so they add up across batches
and across processes (a confusion matrix; a loss sum and a token count).

    accuracy   = Σ_k C[k, k] / Σ C                    (C[true, predicted])
    F1_k       = 2 · TP_k / (2 · TP_k + FP_k + FN_k)
    macro-F1   = mean over classes of F1_k            (every class counts equally)
    perplexity = exp(mean token cross-entropy)
"""

from __future__ import annotations

import math

import torch


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    index = labels.long() * num_classes + preds.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(confusion: torch.Tensor) -> float:
    total = confusion.sum().item()
    return confusion.diagonal().sum().item() / total if total else 0.0


def macro_f1(confusion: torch.Tensor) -> float:
    tp = confusion.diagonal().double()
    fp = confusion.sum(0).double() - tp
    fn = confusion.sum(1).double() - tp
    denom = 2 * tp + fp + fn
    # A class absent from both labels and predictions has no F1; leave it out.
    present = denom > 0
    if not present.any():
        return 0.0
    return (2 * tp[present] / denom[present]).mean().item()


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 700.0))  # exp overflows a float past ~709
