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
