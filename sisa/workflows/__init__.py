"""Workflows built on the public API (`sisa.Sisa`) alone, as a user's own scripts would be:
`proof` (canaries and the evidence of forgetting in a causal LM), `attacks` (the gradient-norm
membership attack, which needs a model's gradients), `approximate` (the approximate unlearning
baselines it is compared with), `export` (`sisa export`) and `demo` (`sisa demo`)."""
