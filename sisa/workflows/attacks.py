"""Membership attacks that need the model itself, not only the log-probabilities `sisa.evidence`
scores: the gradient-norm attack on a causal-LM store's trainable adapter (OpenUnlearning's
`mia_gradnorm`), whose scores `sisa.evidence.auc` reads like the others."""

from __future__ import annotations

import math

import numpy as np
import torch

from sisa.errors import ConfigError
from sisa.training.causal_lm import CausalLMModel, LMInputs
from sisa.training.encoder import torch_threads

NORMS = (1.0, 2.0, math.inf)  # the p of the p-norms OpenUnlearning allows


def gradient_norms(model: CausalLMModel, inputs: LMInputs, batch_size: int = 1,
                   p: float = 2.0) -> np.ndarray:
    """For each text of `inputs` (`Sisa.model_inputs`), the norm of the gradient of its mean token
    NLL (over its learned tokens) with respect to the model's trainable parameters, the adapter's:
    as OpenUnlearning's `GradNormAttack` (src/evals/metrics/mia/gradnorm.py at d3d7cf9, after
    Maini et al. 2024, arXiv:2402.17012), the mean over parameter tensors of each tensor's
    gradient p-norm (p = 2: its L2 norm). nan for a text with no learned token.

    Training leaves its records near a minimum of their loss, so a member's gradient is small:
    `gradient_norm_scores` turns the norms into scores where higher means member-like.

    The model is left as it was: the gradients come from `torch.autograd.grad`, never stored in
    `.grad` (OpenUnlearning zeroes a model's gradients instead), no optimizer step runs, and
    every module's train/eval mode is restored. The gradients are taken in eval mode, where
    OpenUnlearning takes them in train mode: adapter dropout would make the scores random.
    `batch_size` texts share a forward pass (right padding is masked: the same norms, to rounding)."""
    if p not in NORMS:
        raise ConfigError(f"p must be one of 1, 2 or inf (the norms OpenUnlearning allows), got {p!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size!r}")
    params = [q for q in model.model.parameters() if q.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameter to take gradients of")
    modes = {module: module.training for module in model.model.modules()}
    norms: list[float] = []
    try:
        model.model.eval()
        with torch_threads(model.training.torch_threads):
            for start in range(0, len(inputs), batch_size):
                positions = list(range(start, min(start + batch_size, len(inputs))))
                logp, counts = model.sequence_logprobs(inputs, positions)
                for row in range(len(positions)):
                    if not int(counts[row]):
                        norms.append(math.nan)
                        continue
                    loss = -logp[row] / counts[row]
                    grads = torch.autograd.grad(loss, params, retain_graph=row < len(positions) - 1,
                                                allow_unused=True)
                    per_tensor = [torch.linalg.vector_norm(g.detach().float(), ord=p)
                                  for g in grads if g is not None]
                    norms.append(float(torch.stack(per_tensor).mean()) if per_tensor else math.nan)
    finally:
        for module, training in modes.items():
            module.train(training)
    return np.asarray(norms, dtype=float)


def gradient_norm_scores(model: CausalLMModel, inputs: LMInputs, batch_size: int = 1,
                         p: float = 2.0) -> np.ndarray:
    """The gradient-norm attack's scores: the negative `gradient_norms` (a small gradient is
    member-like), oriented as `sisa.evidence.membership_scores` (higher: more likely trained on)."""
    return -gradient_norms(model, inputs, batch_size, p)
