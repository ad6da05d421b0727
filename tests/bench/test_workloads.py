"""Workload generators: the same seed gives the same requests, and each produces the
prefix-sharing structure it claims (RAG: questions behind shared documents; long mix: a long
prompt every Nth request; JSONL: the file's turns and limits)."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from tandem.bench.loadgen.text import TokenCounter
from tandem.bench.loadgen.workloads import (
    RAG_QUESTION_MARK, JsonlDataset, LengthDist, LongPromptMix, MultiTurnChat, RandomWorkload, SharedDocumentRAG,
)

WORDS = TokenCounter()


def first(workload, n):
    return list(itertools.islice(workload.sessions(), n))


def all_workloads(seed: int, counter: TokenCounter = WORDS):
    return [
        RandomWorkload(counter, LengthDist(40, "lognormal", 0.5), LengthDist(20, "uniform", 0.5), seed=seed),
        MultiTurnChat(counter, LengthDist(15), LengthDist(10), 2, 5, think_time_s=0.5, system_prompt_tokens=7, seed=seed),
        SharedDocumentRAG(counter, 3, 120, LengthDist(10, "normal", 0.3), LengthDist(8), popularity_skew=1.0, seed=seed),
        LongPromptMix(counter, LengthDist(30), LengthDist(10), long_tokens=500, long_every=5, seed=seed),
    ]


def test_same_seed_same_sessions_other_seed_other_sessions():
    for a, b, c in zip(all_workloads(11), all_workloads(11), all_workloads(12)):
        assert first(a, 15) == first(b, 15), a.name
        assert first(a, 15) != first(c, 15), a.name


def test_random_lengths_follow_the_distribution():
    workload = RandomWorkload(WORDS, LengthDist(200, "lognormal", 0.5), LengthDist(50, "uniform", 0.2), seed=4)
    sessions = first(workload, 400)
    inputs = np.array([s.turns[0].user_tokens for s in sessions])
    outputs = np.array([s.turns[0].max_tokens for s in sessions])
    assert all(WORDS.count(s.turns[0].user_text) == s.turns[0].user_tokens for s in sessions)
    assert abs(inputs.mean() - 200) < 20 and 0.35 < inputs.std() / inputs.mean() < 0.65
    assert outputs.min() >= 40 and outputs.max() <= 60
    texts = [s.turns[0].user_text for s in sessions]
    assert len({tuple(t.split()[:4]) for t in texts}) > 390  # unrelated prompts diverge at once


def test_multi_turn_requests_carry_history_and_answers():
    workload = MultiTurnChat(WORDS, LengthDist(12), LengthDist(5), 3, 3, think_time_s=1.0, system_prompt_tokens=6, seed=2)
    sessions = first(workload, 6)
    assert len({s.session_id for s in sessions}) == 6
    assert len({s.system_prompt for s in sessions}) == 1  # one system prompt shared by every conversation
    assert all(s.turns[0].think_time_s == 0 and s.turns[1].think_time_s > 0 for s in sessions)
    session = sessions[0]
    answers = ["first answer", "second answer"]
    requests = [session.request(k, answers[:k], WORDS) for k in range(3)]
    for k, request in enumerate(requests):
        assert request.conversation_id == session.session_id and request.turn_index == k
        assert request.messages[-1].content == session.turns[k].user_text
    for earlier, later, answer in zip(requests, requests[1:], answers):
        assert later.messages[: len(earlier.messages)] == earlier.messages
        assert later.messages[len(earlier.messages)].content == answer
        prompt = WORDS.render_chat(earlier.messages)
        assert WORDS.render_chat(later.messages).startswith(prompt + answer)
        assert later.input_tokens > earlier.input_tokens
    with pytest.raises(ValueError):
        session.request(2, answers[:1], WORDS)


def test_rag_questions_share_document_prefixes():
    workload = SharedDocumentRAG(WORDS, 4, 300, LengthDist(12), LengthDist(8), seed=9)
    documents = workload.documents()
    assert len(set(documents)) == 4 and all(WORDS.count(d) == 300 for d in documents)
    prompts = [s.turns[0].user_text for s in first(workload, 60)]
    used = []
    for prompt in prompts:
        matches = [i for i, d in enumerate(documents) if prompt.startswith(f"Document:\n{d}{RAG_QUESTION_MARK}")]
        assert len(matches) == 1
        used.append(matches[0])
    assert set(used) == {0, 1, 2, 3}  # every document is asked about, each many times
    assert min(used.count(i) for i in range(4)) >= 5
    questions = [p.split(RAG_QUESTION_MARK, 1)[1] for p in prompts]
    assert len(set(questions)) == len(questions)


def test_rag_popularity_skew_prefers_the_first_documents():
    workload = SharedDocumentRAG(WORDS, 5, 20, LengthDist(5), LengthDist(4), popularity_skew=1.5, seed=1)
    picks = [int(s.session_id.rsplit("doc", 1)[1]) for s in first(workload, 500)]
    counts = [picks.count(i) for i in range(5)]
    assert counts == sorted(counts, reverse=True) and counts[0] > 3 * counts[4]


def test_long_prompt_mix_is_periodic():
    workload = LongPromptMix(WORDS, LengthDist(30), LengthDist(10), long_tokens=2000, long_every=4,
                             long_output_tokens=3, seed=0)
    sessions = first(workload, 20)
    kinds = [s.kind for s in sessions]
    assert kinds == (["short"] * 3 + ["long"]) * 5
    for session in sessions:
        turn = session.turns[0]
        assert WORDS.count(turn.user_text) == turn.user_tokens == (2000 if session.kind == "long" else 30)
        assert turn.max_tokens == (3 if session.kind == "long" else 10)


def test_jsonl_sharegpt_messages_and_prompt_records(tmp_path):
    path = tmp_path / "prompts.jsonl"
    records = [
        {"id": "a", "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "what is a cat"}, {"from": "gpt", "value": "a small furry animal"},
            {"from": "human", "value": "and a dog"}, {"from": "gpt", "value": "a loyal one"}]},
        {"messages": [{"role": "user", "content": "hello there"}]},
        {"prompt": "complete this sentence", "max_tokens": 7},
        {"unrelated": 1},
        {"conversations": [{"from": "gpt", "value": "no human turn here"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    workload = JsonlDataset(WORDS, path, max_turns=2, default_max_tokens=33, seed=0)
    sessions = first(workload, 6)
    assert first(JsonlDataset(WORDS, path, max_turns=2, default_max_tokens=33, seed=0), 6) == sessions
    by_first_text = {s.turns[0].user_text: s for s in sessions[:3]}
    assert set(by_first_text) == {"what is a cat", "hello there", "complete this sentence"}  # unusable records skipped
    chat = by_first_text["what is a cat"]
    assert chat.chat and chat.system_prompt == "be brief"
    assert [(t.user_text, t.max_tokens) for t in chat.turns] == [("what is a cat", 4), ("and a dog", 3)]
    assert by_first_text["hello there"].turns[0].max_tokens == 33  # no recorded answer: the default
    prompt = by_first_text["complete this sentence"]
    assert not prompt.chat and prompt.turns[0].max_tokens == 7
    assert prompt.request(0, [], WORDS).prompt == "complete this sentence"
    assert [s.turns[0].user_text for s in sessions[3:]] == [s.turns[0].user_text for s in sessions[:3]]  # cycles

    single = first(JsonlDataset(WORDS, path, max_turns=1, seed=0), 3)
    assert all(len(s.turns) == 1 for s in single)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        JsonlDataset(WORDS, bad).records()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A real BPE tokenizer, trained here on English text and saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    from tandem.bench.loadgen.text import _WORDS

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(_WORDS, size=30)) for _ in range(300)]
    # A small vocabulary so some words split into several tokens.
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)
    return str(folder)


def test_lengths_are_exact_under_a_real_tokenizer(tokenizer_dir):
    counter = TokenCounter(tokenizer_dir)
    assert counter.exact and "tokenizer" in counter.method
    rng = np.random.default_rng(0)
    for n in (1, 7, 64, 500):
        text = counter.make_text(n, rng)
        assert abs(counter.count(text) - n) <= 1  # a merge across the cut can cost one token
    assert counter.count("the theory") != len("the theory".split())  # really tokens, not words
    for a, b in zip(all_workloads(3, counter), all_workloads(3, counter)):
        assert first(a, 5) == first(b, 5)
    long_mix = LongPromptMix(counter, LengthDist(30), LengthDist(10), long_tokens=400, long_every=2, seed=0)
    for session in first(long_mix, 4):
        assert abs(counter.count(session.turns[0].user_text) - session.turns[0].user_tokens) <= 1


def test_default_lengths_fit_the_served_models_context_and_given_ones_are_checked():
    from tandem.bench.loadgen import cli as bench_cli
    from tandem.cluster.cli import build_parser

    def lengths(*argv: str, context: int | None) -> dict[str, int]:
        args = build_parser().parse_args(["bench", "run", "--url", "http://x", *argv])
        return bench_cli.resolve_lengths(args, context)

    unknown = lengths(context=None)
    assert unknown == bench_cli.DEFAULT_LENGTHS  # no context known: the documented defaults
    assert lengths(context=2048)["input_tokens"] == 512 and lengths(context=2048)["output_tokens"] == 128
    small = lengths("--workload", "long-mix", context=256)
    assert small["input_tokens"] + small["output_tokens"] <= 256 - 16 and small["long_tokens"] + 16 + 16 <= 256
    rag = lengths("--workload", "rag", context=2048)
    assert rag["document_tokens"] + 32 + rag["output_tokens"] + 16 + 16 <= 2048
    assert lengths("--input-tokens", "3000", context=None)["input_tokens"] == 3000  # nothing to check against
    with pytest.raises(ValueError, match="does not fit the served model's context of 2048 tokens"):
        lengths("--input-tokens", "3000", context=2048)
    with pytest.raises(ValueError, match="--long-tokens"):
        lengths("--workload", "long-mix", "--long-tokens", "8000", context=2048)
