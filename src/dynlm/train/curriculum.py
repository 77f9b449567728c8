"""Curriculum: training stages, each a corpus, a length and a plasticity alpha.

    data:
      corpus: ataturk-tr              # validation and the final evaluation stay on this corpus
      curriculum:
        - {corpus: "parallel-quran:tr", fraction: 0.15, plasticity: 0.1}
        - {corpus: ataturk-tr, fraction: 0.25, plasticity: 0.5}
        - {corpus: ataturk-tr, plasticity: 0.99}      # the last stage runs to train.max_steps

Rules: stages run in order; a stage lasts `steps` optimizer steps or `fraction` of
train.max_steps (rounded), never both; the last stage always runs to max_steps. `plasticity`
(null: leave it as it is) is set on the model when the stage starts (`model.set_plasticity`),
so checkpoints record the alpha in force. Each stage samples training windows from its corpus's
train split (tokenized with the run's tokenizer) from the start of that stage; a resumed run
re-enters the stage of its step at the same data position.

The curriculum is a trainer callback: it swaps the trainer's training tokens and sampler when a
stage begins, and nothing else about the loop changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynlm.data.corpora import get_corpus
from dynlm.data.shards import prepare_corpus
from dynlm.errors import ConfigError
from dynlm.train.config import CurriculumStage, RunConfig
from dynlm.train.data import SequenceSampler


@dataclass
class StagePlan:
    stage: CurriculumStage
    start: int  # first step (0-based) of the stage
    end: int  # one past its last step


def plan_stages(stages: list[CurriculumStage], max_steps: int) -> list[StagePlan]:
    """Step ranges of the stages (see the module docstring for the rules)."""
    plans, start = [], 0
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        length = stage.steps if stage.steps is not None else round((stage.fraction or 0.0) * max_steps)
        end = max_steps if last else min(max_steps, start + length)
        plans.append(StagePlan(stage, start, end))
        start = end
    return plans


class Curriculum:
    """Trainer callback running the stages. Build with `Curriculum.prepare` before training."""

    def __init__(self, plans: list[StagePlan], splits: list[Any]):
        self.plans, self.splits = plans, splits
        self.current: int | None = None

    @classmethod
    def prepare(cls, run: RunConfig, tokenizer: Any, show_progress: bool = True) -> Curriculum:
        """Fetch and tokenize every stage's corpus (a missing one is a one-line DataError now,
        not hours into the run)."""
        plans = plan_stages(run.data.curriculum, run.train.max_steps)
        splits, cache = [], {}
        for plan in plans:
            name = plan.stage.corpus
            if name not in cache:
                cache[name] = prepare_corpus(get_corpus(name), tokenizer, splits=tuple(run.data.splits),
                                             show_progress=show_progress)["train"]
            splits.append(cache[name])
        return cls(plans, splits)

    def check_model(self, model: Any) -> None:
        if any(p.stage.plasticity is not None for p in self.plans) and not hasattr(model, "set_plasticity"):
            raise ConfigError(f"data.curriculum sets a plasticity, but model.type={model.config.type} has none",
                              "remove 'plasticity' from the stages, or train a model with a memory (agiformer)")

    def stage_at(self, step: int) -> int:
        """Index of the stage that trains step `step` (0-based)."""
        for i, plan in enumerate(self.plans):
            if step < plan.end:
                return i
        return len(self.plans) - 1

    def train_split_at(self, step: int) -> Any:
        """The training split in use at `step` (what a resumed trainer must start from)."""
        return self.splits[self.stage_at(step)]

    def enter(self, trainer: Any, index: int, resumed: bool = False) -> None:
        plan, split = self.plans[index], self.splits[index]
        self.current = index
        if not resumed:  # a resumed trainer already holds this stage's sampler, restored exactly
            trainer.train_tokens = split.tokens
            trainer.train_bytes_per_token = split.num_bytes / max(1, len(split.tokens))
            trainer.sampler = SequenceSampler(len(split.tokens), trainer.seq_len, trainer.cfg.batch_size,
                                              trainer.cfg.seed)
        if plan.stage.plasticity is not None:
            trainer.model.set_plasticity(plan.stage.plasticity)
        alpha = getattr(trainer.model, "plasticity", None)
        trainer.say(f"curriculum stage {index + 1}/{len(self.plans)}: {plan.stage.corpus}, steps "
                    f"{plan.start}-{plan.end}" + (f", plasticity {alpha}" if alpha is not None else ""))

    def __call__(self, event: str, trainer: Any, info: dict[str, Any]) -> None:
        if event == "start":
            self.enter(trainer, self.stage_at(trainer.step), resumed=trainer.step > 0)
        elif event == "step":
            index = self.stage_at(trainer.step)  # the stage of the next step
            if index != self.current and trainer.step < trainer.cfg.max_steps:
                self.enter(trainer, index)
