"""Evaluation: nats per token, perplexity and bits per byte (`evaluate`), throughput, memory and
MFU (`dynlm.eval.bench`)."""

from dynlm.eval.evaluate import evaluate

__all__ = ["evaluate"]
