"""`PromptTokenizer` (the ingress's piecewise-cached chat tokenization) gives the tokenizer's own
ids, token for token, on random chat texts full of marker look-alikes; a follow-up turn
tokenizes only its new messages; tokenizers whose pipeline is not piecewise use the plain path;
bad text still raises; eviction never changes a result. Also: the router's block hashes equal
the engine's block by block."""
from __future__ import annotations

import asyncio
import random

import pytest

from tandem.router.prompt_tokenizer import PromptTokenizer, piecewise_splitter

ALPHABET = list("abc xyz  \n\t.,!?'\"0123456789ünï漢🙂") + [
    "<|im_start|>", "<|im_end|>", "<|im_", "|>", "<|pad|>", " hello", "world", "'s", "\r\n", "<|begin_of_text|>"]


def _tokenizer(pre_tokenizer=None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tandem.engine.make_model import _CORPUS, CHAT_TEMPLATE, SPECIAL_TOKENS

    if pre_tokenizer == "llama3":  # Llama-3's regex split, then bytes
        pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]"
                                       r"+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 2, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _random_texts(tokenizer, rng: random.Random, count: int) -> list[str]:
    def text(n: int) -> str:
        return "".join(rng.choice(ALPHABET) for _ in range(n))

    texts = []
    for i in range(count):
        if i % 3:
            messages = [{"role": rng.choice(["user", "assistant", "system"]), "content": text(rng.randint(0, 80))}
                        for _ in range(rng.randint(1, 5))]
            texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        else:
            texts.append(text(rng.randint(0, 200)))
    return texts


@pytest.mark.parametrize("kind", ["bytelevel", "llama3", "metaspace", "prefix_space"])
def test_same_ids_as_the_tokenizer(kind):
    from tokenizers import pre_tokenizers

    pre = {"bytelevel": None, "llama3": "llama3", "metaspace": pre_tokenizers.Metaspace(),
           "prefix_space": pre_tokenizers.ByteLevel(add_prefix_space=True)}[kind]
    tokenizer = _tokenizer(pre)
    # Only provably piecewise pipelines take the cached path; the others stay exact, uncached.
    assert (piecewise_splitter(tokenizer) is not None) == (kind in ("bytelevel", "llama3"))
    prompts = PromptTokenizer(tokenizer, cache_chars=4096, thread_min_chars=100)  # small: evicts, threads
    assert prompts.piecewise == (kind in ("bytelevel", "llama3"))
    texts = _random_texts(tokenizer, random.Random(kind), 150)

    async def encode_all() -> list[list[int]]:
        return [await prompts.encode(text) for text in texts + texts[::-1]]

    got = asyncio.run(encode_all())
    expected = [tokenizer.encode(text, add_special_tokens=False) for text in texts + texts[::-1]]
    assert got == expected


def test_a_follow_up_turn_tokenizes_only_its_new_messages():
    tokenizer = _tokenizer()
    prompts = PromptTokenizer(tokenizer)
    sent: list[str] = []
    batch = prompts._batch

    def spy(pieces, **kwargs):
        sent.extend(pieces)
        return batch(pieces, **kwargs)

    prompts._batch = spy
    history = [{"role": "system", "content": "You are terse. " * 50},
               {"role": "user", "content": "Tell me about prefix caches. " * 200}]

    def encode(messages) -> list[int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = asyncio.run(prompts.encode(text))
        assert ids == tokenizer.encode(text, add_special_tokens=False)
        return ids

    encode(history)
    first_turn = sum(map(len, sent))
    sent.clear()
    history += [{"role": "assistant", "content": "They keep KV blocks."}, {"role": "user", "content": "And then?"}]
    encode(history)
    assert sent == ["assistant\nThey keep KV blocks.", "user\nAnd then?"]
    assert sum(map(len, sent)) < first_turn / 50


def test_bad_text_raises_and_poisons_nothing():
    tokenizer = _tokenizer()
    prompts = PromptTokenizer(tokenizer)
    with pytest.raises((TypeError, ValueError)):
        asyncio.run(prompts.encode("<|im_start|>user\nab\ud800c<|im_end|>"))
    text = "<|im_start|>user\nabc<|im_end|>"
    assert asyncio.run(prompts.encode(text)) == tokenizer.encode(text, add_special_tokens=False)


def test_router_block_hashes_equal_the_engines():
    from tandem.protocol.prefix_hash import hash_block, hash_full_blocks

    rng = random.Random(0)
    for length in (0, 15, 16, 17, 160, 8147):
        ids = [rng.randrange(0, 1 << 32) for _ in range(length)]
        for parent in (0, rng.getrandbits(64)):
            expected, h = [], parent
            for start in range(0, length - 15, 16):
                h = hash_block(h, ids[start:start + 16])
                expected.append(h)
            assert hash_full_blocks(ids, 16, parent) == expected
            assert hash_full_blocks(tuple(ids), 16, parent) == expected
