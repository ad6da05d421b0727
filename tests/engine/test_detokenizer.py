"""Streaming detokenization: deltas concatenate to the full decode and never carry a broken
UTF-8 character; held-back text around stop strings."""
from __future__ import annotations

from transformers import AutoTokenizer

from tandem.engine.detokenizer import IncrementalDetokenizer


def stream(tok, ids, **kw):
    detok = IncrementalDetokenizer(tok, [], **kw)
    deltas = []
    stop = None
    for t in ids:
        stop = detok.add_token(t)
        finished = stop is not None
        deltas.append(detok.take_stream_delta(finished))
        if finished:
            break
    deltas.append(detok.take_stream_delta(True))
    return detok, deltas, stop


def test_multibyte_characters_are_never_split(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    text = "Straße 東京 Привет 🙂🚀 café"
    ids = tok.encode(text, add_special_tokens=False)
    # Byte-level BPE leaves rare characters as several byte tokens: the hard case.
    assert len(ids) > len(text.split())
    detok, deltas, _ = stream(tok, ids)
    assert "".join(deltas) == text == detok.text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_is_held_back_and_trimmed(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    text = "Hello world, how are you today?"
    ids = tok.encode(text, add_special_tokens=False)
    detok, deltas, stop = stream(tok, ids, stop=["are you"])
    assert stop == "are you"
    assert detok.text == "Hello world, how "
    assert "".join(deltas) == "Hello world, how "


def test_a_stop_string_before_min_tokens_neither_stops_nor_trims(llama_dir):
    """As in vLLM, stop strings count only once min_tokens is met: one that completes earlier
    leaves the text whole and the request running (it used to cut the text there while the
    request went on)."""
    from tandem import LLM, SamplingParams

    llm = LLM(llama_dir, num_kv_blocks=64, max_model_len=256)
    prompt = {"prompt_token_ids": [11, 42, 7, 99, 5]}
    base = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    early = llm.engine.tokenizer.decode(base.token_ids[:3])
    stop = early.strip()[-2:] or early[-1:]
    assert stop and stop in base.text[:len(early)], (early, stop)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, min_tokens=12,
                                              stop=[stop]))[0].outputs[0]
    assert len(out.token_ids) >= 12 and out.token_ids == base.token_ids[:len(out.token_ids)]
    assert base.text.startswith(out.text) and len(out.text) > len(early)  # nothing cut at the early stop
    if out.finish_reason == "stop":  # a later occurrence, found once min_tokens was met
        assert base.text[len(out.text):].startswith(stop)
