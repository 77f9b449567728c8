"""Inference: the generation engine (one for every architecture)."""
