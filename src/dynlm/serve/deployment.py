"""What a server serves: one model, or a registry of domain experts behind a router, with an
optional conversation memory that builds each expert's context.

    deployment = Deployment.single("smollm2/")                       # one model
    deployment = Deployment.from_registry("experts.yaml", db="memory.sqlite")
    expert, reason = deployment.choose("auto", "Write a sonnet about the sea")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dynlm
from dynlm.errors import CheckpointError, DynlmError
from dynlm.infer.generate import encode_prompt
from dynlm.memory.embeddings import MiniLMEncoder
from dynlm.memory.store import ConversationMemory
from dynlm.serve.experts import Registry, Router

AUTO = "auto"


@dataclass
class Expert:
    """A loaded model with its tokenizer, under the name clients use."""

    name: str
    model: Any
    tokenizer: Any
    path: str

    @classmethod
    def load(cls, name: str, path: str | Path, device: str = "cpu") -> Expert:
        try:
            model = dynlm.load_pretrained(path, device=device)
            tokenizer = dynlm.load_tokenizer(path)
        except DynlmError as e:
            raise CheckpointError(f"expert '{name}': {e}") from None
        model.eval()
        return cls(name, model, tokenizer, str(path))

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    def encode_text(self, prompt: str) -> list[int]:
        """A plain-text (completion) prompt as the model was trained to see one."""
        return encode_prompt(self.tokenizer, prompt, chat=False) if prompt else []

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a conversation: the tokenizer's own chat template, or (for a model
        without one, e.g. a base model trained here) plain "Role: text" lines ending in "Assistant:"."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"

    def count_prompt(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the rendered chat prompt: what a context budget counts."""
        return len(self.tokenizer.encode(self.render_chat(messages)))


class Deployment:
    """Experts by name, the router that picks one for "auto", and the memory (optional)."""

    def __init__(self, experts: dict[str, Expert], default: str, router: Any = None, memory: Any = None,
                 context_budget: int = 1024):
        if default not in experts:
            raise CheckpointError(f"the default expert '{default}' is not loaded")
        self.experts = experts
        self.default = default
        self.router = router
        self.memory = memory
        self.context_budget = context_budget

    @classmethod
    def single(cls, path: str | Path, name: str | None = None, device: str = "cpu") -> Deployment:
        name = name or Path(path).name.removesuffix(".gguf") or "model"
        return cls({name: Expert.load(name, path, device)}, name)

    @classmethod
    def from_registry(cls, file: str | Path, db: str | Path | None = None, device: str = "cpu",
                      context_budget: int = 1024, encoder: Any = None) -> Deployment:
        """Every expert of the registry loaded, its router, and the memory database when given."""
        registry = Registry.load(file)
        experts = {name: Expert.load(name, registry.resolve(spec), device) for name, spec in registry.experts.items()}
        router = Router(registry, encoder) if len(experts) > 1 else None
        if encoder is None and router is not None and router.learned is not None:
            encoder = router.learned.encoder  # one MiniLM for routing and memory
        deployment = cls(experts, registry.default_name, router, context_budget=context_budget)
        if db is not None:
            deployment.attach_memory(db, context_budget, encoder)
        return deployment

    def model_names(self) -> list[str]:
        return [AUTO, *self.experts]

    def choose(self, requested: str, query: str) -> tuple[Expert, str]:
        """(expert, why): the requested expert, or for "auto" the router's choice. KeyError when
        the name is unknown."""
        if requested != AUTO:
            return self.experts[requested], "requested"
        if self.router is None or len(self.experts) == 1:
            return self.experts[self.default], "default"
        decision = self.router.route(query)
        return self.experts[decision.expert], decision.reason

    def attach_memory(self, db: str | Path, context_budget: int | None = None, encoder: Any = None) -> None:
        """Conversation memory in the SQLite file `db` (created if absent), retrieval by MiniLM."""
        self.memory = ConversationMemory(db, encoder if encoder is not None else MiniLMEncoder.load())
        if context_budget is not None:
            self.context_budget = context_budget

    def context_messages(self, conversation: str | None, expert: Expert,
                         messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The messages the expert receives. With a memory and a conversation id: the memory's
        context for the last user message (the memory is the history: earlier non-system
        messages of the request are not used). Otherwise the request's own messages."""
        if self.memory is None or conversation is None:
            return messages
        return self.memory.build_context(conversation, messages, self.context_budget, expert.count_prompt)

    def remember(self, conversation: str | None, expert: Expert, role: str, text: str) -> None:
        """Store a message in the conversation's memory (committed when this returns): the user's
        before anything is generated, the answer once finished."""
        if self.memory is not None and conversation is not None:
            self.memory.add_message(conversation, role, text, expert.count_tokens, expert.name)

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
