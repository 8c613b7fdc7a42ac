"""Checkpoint files, the torch <-> pytree converter, and per-model loaders."""
