"""sisa's AdamW is torch.optim.AdamW on the CPU, to the bit, without importing torch._dynamo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sisa.training.optim import AdamW
from sisa.training.state import export_state, import_state


def make_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def train(net: torch.nn.Module, optimizer: object, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 7, generator=gen)
        y = torch.randint(0, 3, (5,), generator=gen)
        optimizer.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()  # type: ignore[attr-defined]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01, 0.3])
@pytest.mark.parametrize("lr", [1e-3, 5e-2])
def test_its_steps_are_torch_adamws_to_the_bit(lr: float, weight_decay: float) -> None:
    ours, theirs = make_net(0), make_net(0)
    a = AdamW(ours.parameters(), lr=lr, weight_decay=weight_decay)
    b = torch.optim.AdamW(theirs.parameters(), lr=lr, weight_decay=weight_decay)
    train(ours, a, 25)
    train(theirs, b, 25)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
    mine, torch_sd = a.state_dict(), b.state_dict()
    assert mine["param_groups"] == torch_sd["param_groups"]  # same keys, same order, same values
    assert list(mine["param_groups"][0]) == list(torch_sd["param_groups"][0])
    assert mine["state"].keys() == torch_sd["state"].keys()
    for i, entry in mine["state"].items():
        assert entry.keys() == torch_sd["state"][i].keys()
        for k, v in entry.items():
            assert v.dtype == torch_sd["state"][i][k].dtype and torch.equal(v, torch_sd["state"][i][k])


def test_a_checkpoint_is_the_same_and_resumes_either_way() -> None:
    """The tensors and JSON a checkpoint holds are those torch.optim.AdamW gave; a state saved
    by either resumes in the other, to the same bits as training on without a stop."""
    ours, theirs = make_net(0), make_net(0)
    a = AdamW(ours.parameters(), lr=1e-2, weight_decay=0.01)
    b = torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.01)
    train(ours, a, 10)
    train(theirs, b, 10)
    tensors_a, meta_a = export_state(ours.state_dict(), a)
    tensors_b, meta_b = export_state(theirs.state_dict(), b)
    assert json.dumps(meta_a) == json.dumps(meta_b)
    assert tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    # Resume torch's state in ours, and ours in torch's; then 10 more steps each.
    resumed, back = make_net(9), make_net(9)
    ra = AdamW(resumed.parameters(), lr=0.5)  # hyperparameters come from the checkpoint
    rb = torch.optim.AdamW(back.parameters(), lr=0.5)
    import_state(resumed.load_state_dict, ra, tensors_b, json.loads(json.dumps(meta_b)))
    import_state(back.load_state_dict, rb, tensors_a, json.loads(json.dumps(meta_a)))
    train(resumed, ra, 10, seed=2)
    train(back, rb, 10, seed=2)
    train(ours, a, 10, seed=2)
    for p, q, r in zip(ours.parameters(), resumed.parameters(), back.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r)


def test_a_state_for_another_model_is_refused() -> None:
    a = AdamW(make_net(0).parameters())
    with pytest.raises(ValueError, match=r"holds \[2\] parameters .* this model has 4"):
        a.load_state_dict({"state": {}, "param_groups": [{"lr": 1.0, "params": [0, 1]}]})


def test_training_imports_no_torch_dynamo() -> None:
    """torch.optim imports torch._dynamo as an optimizer is built (a second of a fresh process)."""
    code = ("import sys, torch\n"
            "from sisa.training.optim import AdamW\n"
            "net = torch.nn.Linear(3, 2); opt = AdamW(net.parameters())\n"
            "net(torch.ones(1, 3)).sum().backward(); opt.step(); opt.zero_grad()\n"
            "print('torch._dynamo' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
