"""Autograd-aware functional ops, one per file."""
