"""Verification: every backend of a bundle against the PyTorch reference (parity.json, parity.md)."""
