"""The `tandem` command line: make-model writes a loadable folder, generate prints text."""
from __future__ import annotations

import json

from tandem.cluster.cli import main


def test_make_model_then_generate(tmp_path, capsys):
    out_dir = tmp_path / "qwen3"
    assert main(["make-model", str(out_dir), "--arch", "qwen3", "--seed", "3"]) == 0
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert (out_dir / "model.safetensors").exists() and (out_dir / "tokenizer.json").exists()
    assert "chat_template" in (out_dir / "tokenizer_config.json").read_text() or \
        (out_dir / "chat_template.jinja").exists()
    capsys.readouterr()
    assert main(["generate", "--model", str(out_dir), "--prompt", "Hello", "--max-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert "prompt: 'Hello'" in printed and "(5 tokens, length)" in printed


def test_generate_default_model(tmp_path, monkeypatch, capsys):
    import tandem.engine.make_model as make_model

    monkeypatch.setattr(make_model, "DEFAULT_MODEL_DIR", tmp_path / "tiny-llama")
    assert main(["generate", "--max-tokens", "3"]) == 0
    assert "(3 tokens, length)" in capsys.readouterr().out
    assert (tmp_path / "tiny-llama" / "config.json").exists()


def test_generate_with_an_fp8_kv_cache(tmp_path, capsys):
    out_dir = tmp_path / "llama"
    assert main(["make-model", str(out_dir), "--arch", "llama"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(out_dir), "--prompt", "Hello", "--max-tokens", "4",
                 "--kv-cache-dtype", "fp8"]) == 0
    assert "(4 tokens, length)" in capsys.readouterr().out
