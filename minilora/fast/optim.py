"""AdamW, the update of Loshchilov & Hutter, "Decoupled Weight Decay Regularization"
(ICLR 2019), Algorithm 2, in the form torch.optim.AdamW computes it:

    θ ← θ · (1 − lr·λ)                              decay, decoupled from the gradient
    m ← β1·m + (1 − β1)·g                           first moment
    v ← β2·v + (1 − β2)·g²                          second moment
    θ ← θ − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

The arithmetic is torch's own: its fused kernel (`torch._fused_adamw_`, one pass over
each tensor) where the device has it, else its foreach ops in torch's order, so the
parameters after each step are bit-identical to torch.optim.AdamW(fused=True) or
(foreach=True), and the state dict has torch's layout (checkpoints load either way).

Why not torch.optim.AdamW itself: building any torch.optim.Optimizer runs a method
wrapped by torch._disable_dynamo, whose first call imports torch._dynamo, and that
imports Triton: resident memory and start-up time, in a CPU training run, for a
compiler the run never uses (benchmarks/RESULTS.md has the figures).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# What torch.optim.AdamW's groups also hold: a state dict of ours loaded into it runs
# the same update (its defaults would switch fused off on CPU).
_TORCH_GROUP_KEYS = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False,
                     "decoupled_weight_decay": True}


# CUDA has had the fused kernel since torch 2.0, the CPU since 2.4.
_FUSED_DEVICES = (("cuda", "cpu") if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4) else ("cuda",)) \
    if hasattr(torch, "_fused_adamw_") else ()


def _fused_available(device: torch.device) -> bool:
    return device.type in _FUSED_DEVICES


class AdamW:
    """AdamW over param groups ({"params": [...], "weight_decay": ...}, ...)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, fused: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW needs lr, eps, weight_decay >= 0 and betas in [0, 1); "
                             f"got lr={lr}, eps={eps}, weight_decay={weight_decay}, betas={betas}")
        self.defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = [{**self.defaults, **g, "params": list(g["params"])} for g in groups]
        self.fused = fused
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        if p not in self.state:
            self.state[p] = {
                # torch keeps the step count as a float32 tensor beside the moments
                "step": torch.zeros((), dtype=torch.float32, device=p.device if self._use_fused(p) else "cpu"),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        return self.state[p]

    def _use_fused(self, p: torch.Tensor) -> bool:
        return _fused_available(p.device) if self.fused is None else self.fused

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # The fused kernel and the foreach ops each want one device and dtype per call.
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in params:
                buckets.setdefault((p.device, p.dtype, self._use_fused(p)), []).append(p)
            for (_, _, fused), ps in buckets.items():
                states = [self._state(p) for p in ps]
                (_fused_step if fused else _foreach_step)(ps, states, group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    # ---------------------------------------------------------------- torch's layout

    def state_dict(self) -> dict:
        """{"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]},
        parameters numbered across groups in order, as torch.optim does."""
        index, groups, n = {}, [], 0
        for g in self.param_groups:
            ids = list(range(n, n + len(g["params"])))
            index.update({id(p): i for p, i in zip(g["params"], ids)})
            fused = all(self._use_fused(p) for p in g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, **_TORCH_GROUP_KEYS,
                           "fused": fused or None, "foreach": None if fused else True, "params": ids})
            n += len(ids)
        state = {index[id(p)]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Take a state dict of ours or of torch.optim.AdamW: the same groups of the same
        sizes; hyperparameters come from it, keys only torch uses (foreach, fused, ...) are ignored."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)):
            raise ValueError(
                "optimizer state does not match the parameters being trained: saved groups of "
                f"{[len(s['params']) for s in saved]} tensors, now {[len(g['params']) for g in self.param_groups]}; "
                "resume with the same LoRA settings and model the checkpoint was written with")
        by_index = {}
        for s, g in zip(saved, self.param_groups):
            for k in self.defaults:
                if k in s:
                    g[k] = tuple(s[k]) if k == "betas" else s[k]
            by_index.update(zip(s["params"], g["params"]))
        self.state = {}
        for i, s in state_dict["state"].items():
            p = by_index[int(i)]
            fused = self._use_fused(p)
            self.state[p] = {
                "step": torch.as_tensor(s["step"], dtype=torch.float32).to(p.device if fused else "cpu"),
                "exp_avg": s["exp_avg"].to(device=p.device, dtype=p.dtype),
                "exp_avg_sq": s["exp_avg_sq"].to(device=p.device, dtype=p.dtype),
            }


def _fused_step(params, states, group) -> None:
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    beta1, beta2 = group["betas"]
    torch._fused_adamw_(
        params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
        [], steps, amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
        weight_decay=group["weight_decay"], eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)


def _foreach_step(params, states, group) -> None:
    """torch's _multi_tensor_adam with decoupled decay, op for op (same rounding)."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    grads = [p.grad for p in params]
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    bias_correction1 = [1 - beta1 ** s.item() for s in steps]
    bias_correction2 = [1 - beta2 ** s.item() for s in steps]
    step_size = [(lr / bc) * -1 for bc in bias_correction1]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [bc**0.5 for bc in bias_correction2])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
