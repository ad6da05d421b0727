"""Workloads: seeded, reproducible, endless streams of `Session`s.

A session is what the arrival process starts: a single request, or a conversation whose turns
go one after another (turn k is sent after turn k-1's real answer came back, plus think time).
The same seed gives the same stream; the runner decides how much of it is used.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from tandem.bench.loadgen.request import BenchRequest, ChatMessage
from tandem.bench.loadgen.text import TokenCounter

LENGTH_DISTRIBUTIONS = ("fixed", "uniform", "normal", "lognormal", "exponential")


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: `mean` tokens, shaped by `dist`; `spread` is the uniform
    half-width or the normal/lognormal relative standard deviation. Samples are clamped to
    [minimum, maximum]."""

    mean: int
    dist: str = "fixed"
    spread: float = 0.0
    minimum: int = 1
    maximum: int | None = None

    def __post_init__(self) -> None:
        if self.dist not in LENGTH_DISTRIBUTIONS:
            raise ValueError(f"unknown length distribution {self.dist!r}; choose from {LENGTH_DISTRIBUTIONS}")

    def __str__(self) -> str:
        if self.dist == "fixed" or (self.spread <= 0 and self.dist != "exponential"):
            return f"{self.mean} tokens"
        shape = "" if self.dist == "exponential" else f", spread {self.spread:g}"
        return f"mean {self.mean} tokens ({self.dist}{shape})"

    def sample(self, rng: np.random.Generator) -> int:
        if self.dist == "fixed" or (self.spread <= 0 and self.dist != "exponential"):
            value = float(self.mean)
        elif self.dist == "uniform":
            value = rng.uniform(self.mean * (1 - self.spread), self.mean * (1 + self.spread))
        elif self.dist == "normal":
            value = rng.normal(self.mean, self.mean * self.spread)
        elif self.dist == "lognormal":
            # Parameterised so the distribution's mean is `mean` and its CV is `spread`.
            sigma2 = np.log1p(self.spread**2)
            value = rng.lognormal(np.log(self.mean) - sigma2 / 2, np.sqrt(sigma2))
        else:  # exponential
            value = rng.exponential(self.mean)
        upper = self.maximum if self.maximum is not None else 1 << 30
        return int(min(max(round(value), self.minimum), upper))


@dataclass(frozen=True)
class Turn:
    user_text: str
    user_tokens: int
    max_tokens: int
    think_time_s: float = 0.0  # pause after the previous turn's answer, before this one


@dataclass(frozen=True)
class Session:
    """One request (`chat=False`: the single turn's text is the whole prompt) or a conversation
    (`chat=True`: each request carries every earlier turn and its real answer)."""

    session_id: str
    kind: str
    turns: tuple[Turn, ...]
    chat: bool = False
    system_prompt: str | None = None

    def request(self, turn_index: int, answers: Sequence[str], counter: TokenCounter) -> BenchRequest:
        """The request for `turn_index`, given the server's answers to the turns before it."""
        turn = self.turns[turn_index]
        if not self.chat:
            return BenchRequest(
                max_tokens=turn.max_tokens, prompt=turn.user_text, input_tokens=turn.user_tokens,
                kind=self.kind, conversation_id=None, turn_index=turn_index,
            )
        if len(answers) < turn_index:
            raise ValueError(f"turn {turn_index} needs {turn_index} earlier answers, got {len(answers)}")
        messages: list[ChatMessage] = []
        if self.system_prompt:
            messages.append(ChatMessage("system", self.system_prompt))
        for earlier, answer in zip(self.turns[:turn_index], answers):
            messages.append(ChatMessage("user", earlier.user_text))
            messages.append(ChatMessage("assistant", answer))
        messages.append(ChatMessage("user", turn.user_text))
        return BenchRequest(
            max_tokens=turn.max_tokens, messages=tuple(messages),
            input_tokens=counter.count(counter.render_chat(messages)),
            kind=self.kind, conversation_id=self.session_id, turn_index=turn_index,
        )


class Workload(Protocol):
    name: str

    def sessions(self) -> Iterator[Session]:
        """An endless (or, for a file, cycling) deterministic stream of sessions."""
        ...

    def describe(self) -> str:
        ...


@dataclass(frozen=True)
class RandomWorkload:
    """Independent prompts of random words with lengths drawn from distributions."""

    counter: TokenCounter
    input_len: LengthDist
    output_len: LengthDist
    seed: int = 0
    name: str = "random"

    def sessions(self) -> Iterator[Session]:
        rng = np.random.default_rng(self.seed)
        index = 0
        while True:
            num_input = self.input_len.sample(rng)
            text = self.counter.make_text(num_input, rng)
            turn = Turn(text, num_input, self.output_len.sample(rng))
            yield Session(f"random-{index}", "random", (turn,))
            index += 1

    def describe(self) -> str:
        return f"random: input {self.input_len}, output {self.output_len}"


@dataclass(frozen=True)
class MultiTurnChat:
    """Conversations of `min_turns..max_turns` user turns; each request carries the whole history
    including the server's real earlier answers, after an exponential think time of mean
    `think_time_s`. A `system_prompt_tokens` system prompt, when set, is shared by every
    conversation (as real deployments do)."""

    counter: TokenCounter
    user_len: LengthDist
    output_len: LengthDist
    min_turns: int = 3
    max_turns: int = 6
    think_time_s: float = 1.0
    system_prompt_tokens: int = 0
    seed: int = 0
    name: str = "chat"

    def sessions(self) -> Iterator[Session]:
        rng = np.random.default_rng(self.seed)
        system_prompt = self.counter.make_text(self.system_prompt_tokens, rng) or None
        index = 0
        while True:
            num_turns = int(rng.integers(self.min_turns, self.max_turns + 1))
            turns = []
            for k in range(num_turns):
                num_user = self.user_len.sample(rng)
                think = float(rng.exponential(self.think_time_s)) if k > 0 and self.think_time_s > 0 else 0.0
                turns.append(Turn(self.counter.make_text(num_user, rng), num_user, self.output_len.sample(rng), think))
            yield Session(f"conv-{self.seed}-{index}", "chat", tuple(turns), chat=True, system_prompt=system_prompt)
            index += 1

    def describe(self) -> str:
        return (f"multi-turn chat: {self.min_turns}-{self.max_turns} turns, user {self.user_len}, "
                f"output {self.output_len}, think {self.think_time_s}s, system prompt {self.system_prompt_tokens} tokens")


RAG_QUESTION_MARK = "\n\nQuestion: "


@dataclass(frozen=True)
class SharedDocumentRAG:
    """A few long documents, many short questions: every prompt is one document followed by a
    question, so prompts on the same document share its whole prefix. Documents are picked by a
    Zipf-like popularity (`popularity_skew` 0 = uniform)."""

    counter: TokenCounter
    num_documents: int
    document_tokens: int
    question_len: LengthDist
    output_len: LengthDist
    popularity_skew: float = 0.0
    seed: int = 0
    name: str = "rag"

    def documents(self) -> list[str]:
        rng = np.random.default_rng([self.seed, 1])
        return [self.counter.make_text(self.document_tokens, rng) for _ in range(self.num_documents)]

    def sessions(self) -> Iterator[Session]:
        documents = self.documents()
        prefixes = [f"Document:\n{document}{RAG_QUESTION_MARK}" for document in documents]
        weights = 1.0 / np.arange(1, self.num_documents + 1) ** self.popularity_skew
        weights = weights / weights.sum()
        rng = np.random.default_rng([self.seed, 2])
        index = 0
        while True:
            doc = int(rng.choice(self.num_documents, p=weights))
            num_question = self.question_len.sample(rng)
            question = self.counter.make_text(num_question, rng)
            text = f"{prefixes[doc]}{question}\nAnswer:"
            turn = Turn(text, self.counter.count(text), self.output_len.sample(rng))
            yield Session(f"rag-{index}-doc{doc}", "rag", (turn,))
            index += 1

    def describe(self) -> str:
        return (f"shared-document RAG: {self.num_documents} documents x {self.document_tokens} tokens, "
                f"question {self.question_len}, output {self.output_len}, skew {self.popularity_skew}")


@dataclass(frozen=True)
class LongPromptMix:
    """Steady short chat-like requests with a very long prompt every `long_every`-th request:
    the workload where prefill interferes with decode (watch the short requests' ITL)."""

    counter: TokenCounter
    short_input_len: LengthDist
    output_len: LengthDist
    long_tokens: int
    long_every: int = 20
    long_output_tokens: int = 16
    seed: int = 0
    name: str = "long-mix"

    def sessions(self) -> Iterator[Session]:
        rng = np.random.default_rng(self.seed)
        index = 0
        while True:
            if (index + 1) % self.long_every == 0:
                turn = Turn(self.counter.make_text(self.long_tokens, rng), self.long_tokens, self.long_output_tokens)
                kind = "long"
            else:
                num_input = self.short_input_len.sample(rng)
                turn = Turn(self.counter.make_text(num_input, rng), num_input, self.output_len.sample(rng))
                kind = "short"
            yield Session(f"{kind}-{index}", kind, (turn,))
            index += 1

    def describe(self) -> str:
        return (f"long-prompt mix: short {self.short_input_len} -> {self.output_len}; every {self.long_every}th "
                f"request {self.long_tokens} tokens -> {self.long_output_tokens}")


_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bing", "bard", "model"}


@dataclass(frozen=True)
class _FileRecord:
    system_prompt: str | None
    user_texts: tuple[str, ...]
    reply_texts: tuple[str | None, ...]  # the recorded answer to each user text, when the file has one
    max_tokens: int | None  # an explicit per-record limit ({"prompt": ..., "max_tokens": ...})
    chat: bool


def _parse_record(line: str) -> _FileRecord | None:
    obj = json.loads(line)
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("prompt"), str):
        limit = obj.get("max_tokens", obj.get("output_len"))
        return _FileRecord(None, (obj["prompt"],), (obj.get("completion"),), int(limit) if limit else None, False)
    turns = obj.get("conversations", obj.get("conversation", obj.get("messages")))
    if not isinstance(turns, list):
        return None
    system_prompt: str | None = None
    users: list[str] = []
    replies: list[str | None] = []
    for entry in turns:
        if not isinstance(entry, dict):
            continue
        role = str(entry.get("from", entry.get("role", ""))).lower()
        text = entry.get("value", entry.get("content"))
        if not isinstance(text, str):
            continue
        if role == "system" and not users:
            system_prompt = text
        elif role in _USER_ROLES:
            users.append(text)
            replies.append(None)
        elif role in _ASSISTANT_ROLES and users and replies[-1] is None:
            replies[-1] = text
    if not users:
        return None
    return _FileRecord(system_prompt, tuple(users), tuple(replies), None, True)


@dataclass(frozen=True)
class JsonlDataset:
    """Prompts from a JSONL file: ShareGPT-style `{"conversations": [{"from", "value"}...]}`,
    OpenAI-style `{"messages": [{"role", "content"}...]}`, or `{"prompt": ..., "max_tokens"?}`.
    Conversations replay their user turns (up to `max_turns`) with the server's real answers;
    each turn's max_tokens is the recorded answer's length (clamped to `max_output_tokens`), or
    `default_max_tokens` when there is none. Records are visited in a seeded shuffled order,
    cycling when the budget outlasts the file."""

    counter: TokenCounter
    path: Path
    max_turns: int = 1
    default_max_tokens: int = 128
    max_output_tokens: int = 1024
    think_time_s: float = 0.0
    seed: int = 0
    name: str = "jsonl"

    def records(self) -> list[_FileRecord]:
        records = []
        with open(self.path, encoding="utf-8") as file:
            for line_number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    record = _parse_record(line)
                except (json.JSONDecodeError, ValueError, TypeError) as exc:
                    raise ValueError(f"{self.path}:{line_number}: not a usable JSON record ({exc})") from exc
                if record is not None:
                    records.append(record)
        if not records:
            raise ValueError(f"{self.path}: no usable prompts (expected conversations/messages/prompt records)")
        return records

    def _session(self, record: _FileRecord, session_id: str, rng: np.random.Generator) -> Session:
        turns = []
        for k, (user_text, reply) in enumerate(zip(record.user_texts[: self.max_turns], record.reply_texts)):
            if record.max_tokens is not None:
                max_tokens = record.max_tokens
            elif reply is not None:
                max_tokens = min(max(self.counter.count(reply), 1), self.max_output_tokens)
            else:
                max_tokens = self.default_max_tokens
            think = float(rng.exponential(self.think_time_s)) if k > 0 and self.think_time_s > 0 else 0.0
            turns.append(Turn(user_text, self.counter.count(user_text), max_tokens, think))
        return Session(session_id, "jsonl", tuple(turns), chat=record.chat, system_prompt=record.system_prompt)

    def sessions(self) -> Iterator[Session]:
        records = self.records()
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(records))
        epoch = 0
        while True:
            for position in order:
                yield self._session(records[position], f"jsonl-{position}-{epoch}", rng)
            epoch += 1

    def describe(self) -> str:
        return f"JSONL file {self.path} (max {self.max_turns} turns per conversation)"
