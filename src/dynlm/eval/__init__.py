"""Evaluation: nats per token, perplexity and bits per byte (`evaluate`); FLOPs and MFU helpers
(`flops`). Throughput and memory benchmarks of the train step live in `dynlm.train.bench`."""

from dynlm.eval.evaluate import evaluate

__all__ = ["evaluate"]
