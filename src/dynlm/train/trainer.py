"""The training loop: one for every architecture, through the model contract.

Per optimizer step: `grad_accum` micro-batches forward (bf16 autocast on CUDA) and backward, the
model's auxiliary losses added to the cross-entropy (and logged apart), the global gradient norm
clipped, and fused AdamW. A step whose gradient norm is not finite is skipped on the device (the
fused optimizer's `found_inf`), so the loop never waits for the GPU except to log; the skipped
steps are counted and the run stops with a clear message after `max_nan_steps` in a row.

A recurrent model that sets `bptt_chunk` is trained with truncated BPTT (each micro-batch fed in
chunks, the state carried detached; see `TrainStep._truncated_bptt`).

Validation (loss, bits per byte) runs every `eval_every` steps; checkpoints every `save_every`
(see checkpointing.py). Metrics go to `metrics.jsonl` (and TensorBoard when installed)."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynlm import distributed
from dynlm.distributed import DistContext
from dynlm.errors import CheckpointError, DynlmError, Terminated
from dynlm.eval.evaluate import encode_documents, score_documents, summarize, text_spans
from dynlm.fileio import atomic_write_text
from dynlm.train.checkpointing import (
    TRAINING_INFO_FILE,
    capture_rng_state,
    link_directory,
    optimizer_state_from_files,
    prune_step_checkpoints,
    read_optimizer_tensors,
    read_trainer_state,
    restore_rng_state,
    save_training_checkpoint,
    step_dir_name,
)
from dynlm.train.config import RunConfig, TrainConfig
from dynlm.train.data import SequenceSampler, micro_batches, token_fingerprint
from dynlm.train.optim import build_optimizer, learning_rate, set_learning_rate

Callback = Callable[[str, "Trainer", dict[str, Any]], None]


class TrainingError(DynlmError):
    """Training cannot go on (diverged, or a checkpoint could not be written)."""


def check_batch_split(cfg: TrainConfig, world_size: int) -> None:
    """The global batch must split evenly over processes and accumulation steps."""
    if cfg.batch_size % (world_size * cfg.grad_accum):
        raise TrainingError(f"train.batch_size ({cfg.batch_size}) must be a multiple of "
                            f"grad_accum x processes ({cfg.grad_accum} x {world_size})")


# ---------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean cross-entropy over the micro-batches (device scalar, not synced)
    aux_loss: torch.Tensor | None  # mean weighted auxiliary loss, when the model has one
    grad_norm: torch.Tensor  # global gradient norm before clipping
    nonfinite: torch.Tensor  # bool scalar: the step was skipped
    metrics: dict[str, Any] = field(default_factory=dict)  # the model's metrics of the last micro-batch


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP, FSDP2); sync on the last."""
    if hasattr(module, "require_backward_grad_sync"):  # DDP
        module.require_backward_grad_sync = enabled
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)


class TrainStep:
    """forward/backward over the micro-batches, gradient clipping, NaN guard, AdamW.

    `module` is what is called (the model, DDP around it, or a compiled version); `model` is the
    model itself, whose parameters are clipped. Nothing here reads a value back from the device
    unless the optimizer cannot skip a step on the device (then one read per step)."""

    def __init__(self, module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, dtype: torch.dtype, clip: float, ddp_module: nn.Module | None = None):
        self.module, self.model, self.optimizer = module, model, optimizer
        self.device, self.dtype, self.clip = device, dtype, clip
        self.sync_module = ddp_module if ddp_module is not None else model
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused AdamW skips its update when `found_inf` is set (the GradScaler protocol), so neither
        # DDP nor FSDP2 waits for the device to decide
        self.skip_on_device = bool(optimizer.defaults.get("fused"))

    def __call__(self, batches: Sequence[torch.Tensor]) -> StepOutput:
        n = len(batches)
        loss_sum: torch.Tensor | None = None
        aux_sum: torch.Tensor | None = None
        out = None
        chunk = getattr(self.model, "bptt_chunk", None)
        for i, input_ids in enumerate(batches):
            set_gradient_sync(self.sync_module, i == n - 1)
            if chunk and chunk < input_ids.shape[1]:
                out, ce, aux = self._truncated_bptt(input_ids, chunk, n)
            else:
                with distributed.autocast(self.device, self.dtype):
                    out = self.module(input_ids, labels=input_ids)
                loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
                (loss / n if n > 1 else loss).backward()  # no divide-by-1 kernels, forward and backward
                ce, aux = out.loss.detach(), None if out.aux_loss is None else out.aux_loss.detach().float()
            loss_sum = ce if loss_sum is None else loss_sum + ce
            if aux is not None:
                aux_sum = aux if aux_sum is None else aux_sum + aux
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.skip_on_device:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if hasattr(norm, "full_tensor"):  # sharded (FSDP2) parameters give a DTensor norm
                norm = norm.full_tensor()
            nonfinite = ~torch.isfinite(norm)
            self.optimizer.found_inf = nonfinite.float()
            # the clipping inside the fused update: it divides the gradients by `grad_scale` (and
            # stores them divided) as it reads them, so they are not read and written once more
            self.optimizer.grad_scale = clip_divisor(norm, self.clip) if self.clip > 0 else None
            self.optimizer.step()
        else:
            if self.clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
            else:
                norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if hasattr(norm, "full_tensor"):  # sharded (FSDP2) parameters give a DTensor norm
                norm = norm.full_tensor()
            nonfinite = ~torch.isfinite(norm)
            if not bool(nonfinite):
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        assert out is not None and loss_sum is not None
        return StepOutput(loss=loss_sum / n, aux_loss=None if aux_sum is None else aux_sum / n,
                          grad_norm=norm.detach(), nonfinite=nonfinite, metrics=out.metrics)


    def _truncated_bptt(self, input_ids: torch.Tensor, chunk: int, n: int,
                        ) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
        """Truncated backpropagation through time for recurrent models (`model.bptt_chunk`): the
        sequence is fed in chunks with the state carried; each chunk's loss is backpropagated
        before the next chunk runs and the state is detached between chunks, so activation
        memory is bounded by the chunk length. The loss is the full sequence's mean
        next-token cross-entropy (the last token of a chunk predicts the first of the next).
        The gradient reaching a chunk from later ones is cut: that is the truncation."""
        b, t = input_ids.shape
        targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)  # [B, T]; the last token predicts nothing
        count = (targets != -100).sum()
        state = self.model.init_state(b, device=input_ids.device)
        ce_total = torch.zeros((), device=input_ids.device)
        aux_total: torch.Tensor | None = None
        pieces = range(0, t, chunk)
        for start in pieces:
            with distributed.autocast(self.device, self.dtype):
                out = self.module(input_ids[:, start:start + chunk], state=state)
            piece = targets[:, start:start + chunk]
            ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), piece.reshape(-1),
                                 ignore_index=-100, reduction="sum") / count
            loss = ce if out.aux_loss is None else ce + out.aux_loss / len(pieces)
            (loss / n).backward()
            ce_total += ce.detach()
            if out.aux_loss is not None:
                aux = out.aux_loss.detach().float() / len(pieces)
                aux_total = aux if aux_total is None else aux_total + aux
            state = out.state.detach()
        return out, ce_total, aux_total


def clip_divisor(norm: torch.Tensor, clip: float) -> torch.Tensor:
    """What the gradients are divided by to clip their global norm at `clip`: the reciprocal of
    `clip_grad_norm_`'s coefficient min(1, clip / (norm + 1e-6)). fp32 scalar on the device."""
    return ((norm.float() + 1e-6) / clip).clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """metrics.jsonl in the run folder (rank 0), plus TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (logged after the checkpoint a run resumes from)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.writer is not None:
            prefix = record.get("event", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "event"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# The trainer


def _as_float(value: Any) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


class Trainer:
    """Trains `model` (already on its device, weights loaded) on the run's data.

    `fit()` runs to `train.max_steps`; `resume(checkpoint_dir)` first restores the exact state of a
    checkpoint. Callbacks are called as `callback(event, trainer, info)` with events "start",
    "step" (after each optimizer step; `info["output"]` is its StepOutput, device tensors not yet
    read back), "log", "eval", "save" and "end"."""

    def __init__(self, run: RunConfig, model: nn.Module, tokenizer: Any, splits: dict[str, Any], run_dir: Path,
                 ctx: DistContext, callbacks: Sequence[Callback] = ()):
        self.run, self.cfg = run, run.train
        self.model, self.tokenizer, self.splits = model, tokenizer, splits
        self.run_dir, self.ctx = run_dir, ctx
        self.callbacks = list(callbacks)
        self.device = ctx.device
        self.dtype = distributed.resolve_dtype(self.cfg.dtype, self.device)
        self.seq_len = run.data.seq_len

        check_batch_split(self.cfg, ctx.world_size)
        self.tokens_per_step = self.cfg.batch_size * self.seq_len

        model.fused_loss = self.cfg.fused_loss  # read by the transformer family's forward
        cfg = self.cfg
        wrapped = distributed.wrap_model(model, ctx, cfg.fsdp, bucket_cap_mb=cfg.ddp_bucket_cap_mb,
                                         reshard_after_forward=cfg.fsdp_reshard_after_forward,
                                         param_dtype=distributed.resolve_dtype(cfg.fsdp_param_dtype, self.device),
                                         reduce_dtype=distributed.resolve_dtype(cfg.fsdp_reduce_dtype, self.device))
        self.ddp_module = wrapped if wrapped is not model else None
        # FSDP2 shards in place, so the optimizer is built after wrapping, on the sharded parameters
        self.optimizer = build_optimizer(model, self.cfg, self.device)
        module = torch.compile(wrapped, mode=self.cfg.compile_mode) if self.cfg.compile else wrapped
        self.step_fn = TrainStep(module, model, self.optimizer, self.device, self.dtype, self.cfg.clip,
                                 ddp_module=self.ddp_module)

        train_tokens = splits["train"].tokens
        self.train_tokens = train_tokens
        # training loss -> bits per byte, estimated with the split's mean bytes per token (the
        # validation figure is exact)
        self.train_bytes_per_token = splits["train"].num_bytes / max(1, len(train_tokens))
        fingerprint = getattr(splits["train"], "fingerprint", None) or token_fingerprint(train_tokens)
        self.sampler = SequenceSampler(len(train_tokens), self.seq_len, self.cfg.batch_size, self.cfg.seed,
                                       fingerprint)
        val_texts = text_spans(splits["val"].texts(), self.cfg.eval_bytes)
        self.val_documents = encode_documents(tokenizer, val_texts)
        self.val_bytes = sum(tokenizer.count_bytes(t) for t in val_texts)
        self.val_chars = sum(len(t) for t in val_texts)
        self.eval_stride = self.cfg.eval_stride or max(1, self.seq_len // 2)

        self.step = 0
        self.tokens_seen = 0
        self.best_bpb = math.inf
        self.best_step: int | None = None
        self.last_val: dict[str, Any] | None = None
        self.skipped_steps = 0
        self.elapsed_before = 0.0  # training seconds of the runs this one resumes
        self.last_saved: Path | None = None
        # device-side counters of non-finite steps, read when logging (no per-step sync)
        self._bad_total = torch.zeros((), device=self.device)
        self._bad_run = torch.zeros((), device=self.device)
        self._bad_run_max = torch.zeros((), device=self.device)
        self._loss_sum = torch.zeros((), device=self.device)
        self._aux_sum = torch.zeros((), device=self.device)
        self._good_steps = torch.zeros((), device=self.device)
        self._has_aux = False
        self._last: StepOutput | None = None
        self.metrics = MetricsLog(run_dir, enabled=ctx.is_main)

    # -- events and messages -------------------------------------------------------------------
    def _emit(self, event: str, info: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback(event, self, info)

    def say(self, message: str) -> None:
        if self.ctx.is_main:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)

    # -- resume ---------------------------------------------------------------------------------
    def resume(self, checkpoint: Path) -> None:
        """Restore optimizer, step, data position, counters and RNG states from a checkpoint whose
        weights are already in the model."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = read_trainer_state(checkpoint)
        optimizer_state = optimizer_state_from_files(read_optimizer_tensors(checkpoint),
                                                     state["optimizer_param_groups"])
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=self._state_dict_options())
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.best_bpb = float(state["best_bpb"]) if state.get("best_bpb") is not None else math.inf
        self.best_step = state.get("best_step")
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._bad_total.fill_(self.skipped_steps)
        self._bad_run.fill_(int(state.get("nonfinite_run", 0)))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.last_saved = checkpoint
        self.metrics.truncate_after(self.step)
        self._adopt_newer_best()
        ranks = state["rng"]
        if len(ranks) == self.ctx.world_size:
            restore_rng_state(ranks[self.ctx.rank], self.device)
        else:
            # Another number of processes: no rank's saved state is "this rank's". The documented
            # rule (docs/training.md): every rank reseeds from (train.seed + step, rank), so the
            # continuation is deterministic for a given world size, though not bit-identical to an
            # uninterrupted run.
            seed_everything(self.cfg.seed + self.step, self.ctx.rank)
            self.say(f"note: {checkpoint} was written by {len(ranks)} process(es), this run has "
                     f"{self.ctx.world_size}: RNG states reseeded from (train.seed + step, rank)")
        self.say(f"resumed from {checkpoint} at step {self.step}")

    def _adopt_newer_best(self) -> None:
        """`best/` may be newer than the checkpoint resumed from (a better evaluation was saved as
        best/ after the last step checkpoint, then the run stopped): keep its figure, so that
        the resumed run only replaces best/ with a model that beats it."""
        info_file = self.run_dir / "best" / TRAINING_INFO_FILE
        try:
            info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        except (OSError, json.JSONDecodeError):
            return
        bpb = (info.get("val") or {}).get("bpb")
        if isinstance(bpb, (int, float)) and math.isfinite(bpb) and bpb < self.best_bpb:
            self.best_bpb, self.best_step = float(bpb), int(info.get("step", self.step))
            self.say(f"best/ (step {self.best_step}, {bpb:.4f} bits per byte) is newer than the checkpoint; "
                     "it stays the figure to beat")

    def _state_dict_options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        if self.cfg.fsdp:
            return StateDictOptions(full_state_dict=True, cpu_offload=True)
        return StateDictOptions()

    # -- the loop -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _deferred_signals(self) -> Iterator[None]:
        """Ctrl-C (SIGINT) and SIGTERM stop the loop at the next step boundary, where the state is
        consistent and can be saved; a second signal stops at once. Single process only: under
        torchrun the ranks would stop at different steps, so the default behaviour stays."""
        self._stop_signal: int | None = None
        if self.ctx.world_size > 1 or threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:  # asked twice: stop now, without saving
                raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
            self._stop_signal = signum

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_if_asked(self) -> None:
        if self._stop_signal is not None:
            self._clean_stop = True
            raise Terminated() if self._stop_signal == signal.SIGTERM else KeyboardInterrupt()

    def fit(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._emit("start", {"step": self.step})
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=not (self.ctx.is_main and cfg.progress), mininterval=0.1 if sys.stderr.isatty() else 5.0)
        self._t_start = time.perf_counter()
        t_log, tokens_at_log = time.perf_counter(), self.tokens_seen
        postfix: dict[str, str] = {}
        self._clean_stop = False
        try:
            with self._deferred_signals():
                while self.step < cfg.max_steps:
                    starts = self.sampler.next_batch()
                    batches = [b.to(self.device, non_blocking=True) for b in micro_batches(
                        self.train_tokens, starts, self.seq_len, self.ctx.rank, self.ctx.world_size, cfg.grad_accum)]
                    set_learning_rate(self.optimizer, learning_rate(self.step, cfg))
                    out = self.step_fn(batches)
                    self._accumulate(out)
                    self.step += 1
                    self.tokens_seen += self.tokens_per_step
                    bar.update(1)
                    self._emit("step", {"step": self.step, "output": out})

                    last_step = self.step == cfg.max_steps
                    stopping = self._stop_signal is not None
                    if self.step % cfg.log_every == 0 or last_step or stopping:
                        now = time.perf_counter()
                        record = self._log(now - t_log, self.tokens_seen - tokens_at_log)
                        t_log, tokens_at_log = now, self.tokens_seen
                        postfix["loss"] = "nan" if record["loss"] is None else f"{record['loss']:.3f}"
                        if record["loss"] is not None:
                            postfix["bpb"] = f"{record['train_bpb']:.3f}"
                        postfix["tok/s"] = f"{record['tokens_per_s']:,.0f}"
                        bar.set_postfix(postfix, refresh=False)
                    paused_at = time.perf_counter()
                    if (cfg.eval_every and self.step % cfg.eval_every == 0) or last_step:
                        postfix["val_bpb"] = f"{self.validate()['bpb']:.3f}"
                        bar.set_postfix(postfix, refresh=False)
                    if self.step % cfg.save_every == 0 or last_step:
                        self.save()
                    t_log += time.perf_counter() - paused_at  # tokens/s counts training time only
                    self._stop_if_asked()
                self._stop_if_asked()
        except KeyboardInterrupt as e:
            bar.close()
            what = "stopped (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            if self._clean_stop and self.step > 0 and self.ctx.is_main:
                # a step boundary: save it, so that even a run stopped before its first periodic
                # save continues from here
                if self.last_saved is None or self.last_saved.name != step_dir_name(self.step):
                    self.save()
                where = f"saved {self.last_saved}"
            elif self.last_saved:
                where = f"the last checkpoint ({self.last_saved}) is intact"
            else:
                where = "no checkpoint was written yet"
            resume = f"; continue with `dynlm train --resume {self.run_dir}`" if self.last_saved else ""
            self.say(f"training {what} at step {self.step}: {where}{resume}")
            raise
        finally:
            bar.close()
            self.metrics.close()
        summary = {"step": self.step, "tokens": self.tokens_seen, "skipped_steps": self.skipped_steps,
                   "best_step": self.best_step, "best_val_bpb": self.best_bpb if self.best_step is not None else None,
                   "train_seconds": self.elapsed}
        self._emit("end", summary)
        return summary

    @property
    def elapsed(self) -> float:
        started = getattr(self, "_t_start", None)
        return self.elapsed_before + (time.perf_counter() - started if started is not None else 0.0)

    def _accumulate(self, out: StepOutput) -> None:
        bad = out.nonfinite.float()
        self._bad_total += bad
        self._bad_run.mul_(bad).add_(bad)  # consecutive non-finite steps: reset by a good one
        torch.maximum(self._bad_run_max, self._bad_run, out=self._bad_run_max)
        good = 1.0 - bad
        self._loss_sum += torch.where(out.nonfinite, torch.zeros_like(out.loss), out.loss).float()
        if out.aux_loss is not None:
            self._has_aux = True
            self._aux_sum += torch.where(out.nonfinite, torch.zeros_like(out.aux_loss), out.aux_loss)
        self._good_steps += good
        self._last = out

    def _check_nonfinite(self) -> None:
        """Read the device counters; stop when too many steps in a row were not finite."""
        self.skipped_steps = int(self._bad_total.item())
        worst_run = int(self._bad_run_max.item())
        self._bad_run_max.copy_(self._bad_run)
        if worst_run >= self.cfg.max_nan_steps:
            where = f"last good checkpoint: {self.last_saved}" if self.last_saved else "no checkpoint was written"
            raise TrainingError(f"training stopped at step {self.step}: {worst_run} steps in a row had a non-finite "
                                f"loss or gradient (each was skipped, none applied); {where}",
                                "lower train.lr, raise train.warmup_steps or check the data")

    def _log(self, seconds: float, tokens: int) -> dict[str, Any]:
        # one read-back of everything accumulated since the last log
        sums = torch.stack([self._loss_sum, self._aux_sum, self._good_steps]).double()
        sums = distributed.all_reduce_sum(sums, self.ctx).cpu()
        good_steps = float(sums[2])
        loss = float(sums[0]) / good_steps if good_steps else None
        aux = float(sums[1]) / good_steps if good_steps and self._has_aux else None
        for tensor in (self._loss_sum, self._aux_sum, self._good_steps):
            tensor.zero_()
        self._check_nonfinite()
        last = self._last
        record: dict[str, Any] = {
            "event": "train", "step": self.step, "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(last.grad_norm) if last is not None else None,
            "tokens": self.tokens_seen, "tokens_per_s": tokens / max(seconds, 1e-9),
            "epoch": self.sampler.epoch, "skipped_steps": self.skipped_steps, "elapsed_s": self.elapsed,
        }
        if loss is not None:
            record["train_bpb"] = loss / (math.log(2) * self.train_bytes_per_token)
        if aux is not None:
            record["aux_loss"] = aux
        if last is not None:
            for key, value in last.metrics.items():
                record[f"model/{key}"] = _as_float(value)
        self.metrics.write(record)
        self._emit("log", record)
        return record

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        total, count = score_documents(self.model, self.val_documents, self.seq_len, self.eval_stride,
                                       self.cfg.eval_batch_size, self.dtype, self.ctx)
        result = summarize(total, count, self.val_bytes, self.val_chars, len(self.val_documents),
                           self.seq_len, self.eval_stride)
        self.last_val = result
        record = {"event": "eval", "step": self.step, "split": "val", "val_loss": result["loss_nats"],
                  "val_bpb": result["bpb"], "val_ppl": result["ppl"], "val_tokens": result["num_tokens"],
                  "val_bytes": result["num_bytes"]}
        self.metrics.write(record)
        if math.isfinite(result["bpb"]) and result["bpb"] < self.best_bpb:
            self.best_bpb, self.best_step = result["bpb"], self.step
            self._save_best()
        self._emit("eval", record)
        return result

    # -- checkpoints ----------------------------------------------------------------------------
    def _parameters_finite(self) -> bool:
        """Every rank checks its parameters (its shards under FSDP2); all must be finite."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        flags = torch.stack([torch.isfinite(p.detach()).all() for p in local]).all()
        flags = distributed.all_reduce_sum((~flags).float().reshape(1), self.ctx)
        return float(flags[0]) == 0

    def _full_model_tensors(self) -> dict[str, torch.Tensor] | None:
        """The full weights when sharded (a collective: every rank calls it); None otherwise
        (the checkpoint writer reads the model itself)."""
        if not self.cfg.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(self.model, options=self._state_dict_options())
        keep = {name for name, _ in self.model.named_parameters()} | {name for name, _ in self.model.named_buffers()}
        return {k: v.contiguous() for k, v in full.items() if k in keep}

    def training_info(self) -> dict[str, Any]:
        """training.json: what the evaluator and readers want to know about the run."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "seq_len": self.seq_len,
                "corpus": self.run.data.corpus, "tokenizer": self.run.data.tokenizer,
                "splits": list(self.run.data.splits), "run_dir": str(self.run_dir),
                "val": self.last_val}

    def _write_guarded(self, path: Path, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as e:
            previous = f"the previous checkpoint ({self.last_saved}) is intact" if self.last_saved else \
                "no earlier checkpoint exists"
            raise TrainingError(f"could not write checkpoint {path}: {e}; {previous}") from None

    def _save_best(self) -> None:
        tensors = self._full_model_tensors()
        if self.ctx.is_main:
            path = self.run_dir / "best"
            self._write_guarded(path, lambda: save_training_checkpoint(
                path, self.model, self.tokenizer, tensors, self.training_info()))
        distributed.barrier(self.ctx)

    def save(self) -> Path:
        """A resumable checkpoint of the current step: step-XXXXXX/, then last/ pointing at it."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        self._check_nonfinite()
        if not self._parameters_finite():
            raise TrainingError(f"step {self.step}: the parameters are not finite; no checkpoint written "
                                f"(last good one: {self.last_saved})")
        tensors = self._full_model_tensors()
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=self._state_dict_options())
        rng = distributed.all_gather_objects(capture_rng_state(self.device), self.ctx)
        path = self.run_dir / step_dir_name(self.step)
        if self.ctx.is_main:
            state = {
                "step": self.step, "tokens_seen": self.tokens_seen, "sampler": self.sampler.state_dict(),
                "schedule": {"name": self.cfg.schedule, "lr": self.cfg.lr, "min_lr": self.cfg.min_lr,
                             "warmup_steps": self.cfg.warmup_steps, "max_steps": self.cfg.max_steps},
                "best_bpb": self.best_bpb if math.isfinite(self.best_bpb) else None, "best_step": self.best_step,
                "skipped_steps": self.skipped_steps, "nonfinite_run": int(self._bad_run.item()),
                "elapsed_s": self.elapsed, "world_size": self.ctx.world_size, "rng": rng,
            }

            def write() -> None:
                save_training_checkpoint(path, self.model, self.tokenizer, tensors, self.training_info(),
                                         optimizer_state, state)
                link_directory(path, self.run_dir / "last")
                prune_step_checkpoints(self.run_dir, self.cfg.keep_last)

            self._write_guarded(path, write)
        distributed.barrier(self.ctx)
        self.last_saved = path
        self._emit("save", {"step": self.step, "path": str(path)})
        return path


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Copy a checkpoint's weights into `model` (before it is wrapped or sharded)."""
    from dynlm.checkpoint import WEIGHTS_NAME, load_state_into, read_safetensors

    try:
        load_state_into(model, read_safetensors(checkpoint), str(checkpoint / WEIGHTS_NAME))
    except CheckpointError:
        raise
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: cannot load weights ({str(e).splitlines()[0]})") from None


def seed_everything(seed: int, rank: int = 0) -> None:
    import random

    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)
