"""Workflows built on the public API (`sisa.Sisa`) alone, as a user's own scripts would be:
`proof` (canaries and the evidence of forgetting in a causal LM), `approximate` (the approximate
unlearning baselines it is compared with) and `demo` (`sisa demo`)."""
