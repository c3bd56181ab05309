"""AdamW for the shard trainers, without `torch.optim`.

Building any `torch.optim` optimizer imports `torch._dynamo` (its `add_param_group`, `zero_grad`
and `step` are wrapped for `torch.compile`, which sisa never uses): about a second of every fresh
`sisa train`, `add` and `forget` process, longer than many a retrain. This is `torch.optim.AdamW`
as it runs on CPU tensors (`torch.optim.adam._single_tensor_adam` with decoupled weight decay),
operation for operation, so its updates are AdamW's to the bit, and its `state_dict` is laid out
as AdamW's, so a checkpoint holds the same tensors and the same JSON (tests/test_optim.py checks
both against `torch.optim.AdamW`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch


class Optimizer(Protocol):
    """What a trainer's checkpoint needs of its optimizer (`sisa.training.state`)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class AdamW:
    """AdamW over one group of parameters: `zero_grad`, `step`, `state_dict`, `load_state_dict`
    as `torch.optim.AdamW` has them (no amsgrad, no maximize, no closures, no extra groups)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        self.params = list(params)
        # The keys and order of torch.optim.AdamW's group: the checkpoint's JSON is the same.
        self.param_groups: list[dict[str, Any]] = [{
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": False,
            "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
            "fused": None, "decoupled_weight_decay": True, "params": list(range(len(self.params)))}]
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, eps, weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        for index, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            state = self.state.get(index)
            if state is None:
                state = self.state[index] = {
                    "step": torch.tensor(0.0, dtype=_scalar_dtype()),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
            step_t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
            step_t += 1
            if weight_decay != 0:
                param.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = step_t.item()
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)

    def state_dict(self) -> dict[str, Any]:
        """As `torch.optim.Optimizer.state_dict`: the state by parameter index, the group's
        hyperparameters with the parameters' indices last."""
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.params)))
        return {"state": {i: dict(s) for i, s in sorted(self.state.items())}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As `torch.optim.Optimizer.load_state_dict`: moments onto their parameter's device and
        dtype, the step count kept as it is (a CPU scalar), hyperparameters from the dict."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"the optimizer state holds {[len(g['params']) for g in groups]} "
                             f"parameters in its groups; this model has {len(self.params)}")
        state: dict[int, dict[str, torch.Tensor]] = {}
        for index, entry in state_dict["state"].items():
            param = self.params[int(index)]
            state[int(index)] = {
                k: v if k == "step" else v.to(dtype=param.dtype, device=param.device)
                for k, v in entry.items()}
        # Our keys in our order, the values saved (a key an older torch did not save keeps ours).
        group = dict(self.param_groups[0])
        group.update({k: v for k, v in groups[0].items() if k != "params"})
        group["params"] = list(range(len(self.params)))
        self.param_groups = [group]
        self.state = state


def _scalar_dtype() -> torch.dtype:
    """The step count's dtype, as torch.optim picks it (float64 under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
