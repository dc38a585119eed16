"""The shipped model: files verified by hash, quality as claimed, usable from the CLI."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from covey.models._adapter import Adapter
from covey.models._artifacts import ARTIFACT_FILES, ArtifactError, Artifacts, artifact_dir
from covey.models._data import load_corpus
from covey.models._evaluate import evaluate, examples_to_batches, scored, torch_scored
from covey.models._generate import SamplingParams
from covey.models._onnx import OnnxLM, export_onnx
from covey.models._runtime import load_model, load_onnx_generator
from covey.models._tokenizer import ChatMessage
from tests.conftest import Covey, cli_env


@pytest.fixture(scope="module")
def shipped():
    return load_model()


def test_files_verify_and_fit_the_budget() -> None:
    artifacts = Artifacts.load()
    total = sum(artifacts.path(n).stat().st_size for n in ARTIFACT_FILES)
    assert total <= 40 * 1024 * 1024
    assert set(artifacts.card["files"]) == set(ARTIFACT_FILES)


def test_altered_file_is_named(tmp_path: Path, covey: Covey) -> None:
    copy = tmp_path / "artifacts"
    shutil.copytree(artifact_dir(), copy)
    weights = copy / "base.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"base\.safetensors is corrupt"):
        Artifacts.load(copy)
    shutil.copy(artifact_dir() / "base.safetensors", weights)
    (copy / "lm-int8.onnx").unlink()
    result = covey("models", "generate", "hi", env=cli_env(tmp_path, COVEY_MODEL_DIR=str(copy)))
    assert result.returncode == 6
    assert result.stderr.strip().splitlines() == [
        f"error: model file {copy / 'lm-int8.onnx'} is missing; rebuild with `covey models build`"]


def test_model_beats_the_bigram_baseline_widely() -> None:
    metrics = Artifacts.load().card["metrics"]
    for split in ("public_heldout", "federated_test"):
        model, bigram = metrics[split]["model_int8_onnx"], metrics[split]["bigram_baseline"]
        assert model["perplexity"] < 0.70 * bigram["perplexity"], split
        assert model["top1"] > bigram["top1"] + 0.035, split


def test_onnx_and_int8_agree_with_torch(shipped, tmp_path: Path) -> None:
    """Recomputed here, not read from the card: fp32 ONNX within 1e-4, int8 within 3 %."""
    model, tok, artifacts = shipped
    examples = list(load_corpus().public_eval[:300])
    batches = examples_to_batches(tok, examples, model.cfg.context)
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, fp32)
    session = OnnxLM(fp32)
    for ids, _ in batches[:5]:
        with torch.no_grad():
            ref = model(torch.from_numpy(ids))[0].numpy()
        assert np.abs(session.logits(ids) - ref).max() < 1e-4

    base = evaluate(torch_scored(model), batches, len(examples))
    int8 = evaluate(scored(OnnxLM(artifacts.path("lm-int8.onnx")).logits), batches,
                    len(examples))
    assert int8.perplexity / base.perplexity < 1.03


def test_greeting_reply_reads_as_english() -> None:
    corpus = load_corpus()
    words = Counter(w for t in corpus.public_texts()[:20000] for w in re.findall(r"[a-z']+",
                                                                                 t.lower()))
    english = {w for w, n in words.items() if n >= 5}
    gen = load_onnx_generator()
    for prompt in ("hi", "hello! how are you?"):
        reply = "".join(gen.stream_chat([ChatMessage("user", prompt)],
                                        SamplingParams(temperature=0.0, max_tokens=24)))
        tokens = re.findall(r"[a-z']+", reply.lower())
        assert len(tokens) >= 2, reply
        assert sum(t in english for t in tokens) / len(tokens) >= 0.8, reply


def test_adapter_applies_without_restart(shipped) -> None:
    model, _, _ = shipped
    gen = load_onnx_generator()
    params = SamplingParams(temperature=0.0, max_tokens=12)
    before = "".join(gen.stream_chat([ChatMessage("user", "hi")], params))
    rng = np.random.default_rng(0)
    adapter = Adapter({n: rng.normal(0, 0.5, a.shape).astype(np.float32)
                       for n, a in Adapter.from_model(model).tensors.items()})
    gen.set_adapter(dict(adapter.tensors))
    after = "".join(gen.stream_chat([ChatMessage("user", "hi")], params))
    assert after != before
    gen.set_adapter({})
    assert "".join(gen.stream_chat([ChatMessage("user", "hi")], params)) == before
    assert adapter.nbytes == Artifacts.load().card["parameters"]["lora_bytes_fp32"]


def test_cli(covey: Covey) -> None:
    info = json.loads(covey("models", "info", "--json").stdout)
    assert info["parameters"]["base"] > 1_000_000
    assert info["files"]["lm-int8.onnx"]["sha256"]
    data = json.loads(covey("models", "info", "--data", "--json").stdout)
    assert data["federated_users"] > 500
    runs = [covey("models", "generate", "hello", "--seed", "5", "--max-tokens", "10")
            for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip()
    raw = covey("models", "generate", "I went to the", "--raw", "--backend", "torch",
                "--temperature", "0")
    assert raw.returncode == 0 and raw.stdout.strip(), raw.stderr


def test_onnx_generation_does_not_load_torch() -> None:
    """A pod answering with the int8 model never pays torch's memory."""
    import subprocess
    import sys

    code = ("import sys\nfrom covey.models import ChatMessage, SamplingParams, create_generator\n"
            "g = create_generator('onnx')\n"
            "''.join(g.stream_chat([ChatMessage('user', 'hi')], SamplingParams(max_tokens=4)))\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip()
    assert out == "False"
