"""On-device models: data split, tokenizer, language model, adapters, ONNX, embedder.

Public surface (imported lazily, so ``import covey.models`` loads neither torch nor
onnxruntime until a name that needs it is used):

    load_corpus, Corpus, Example, FederatedUser, share_of   the chitchat split
    ChatTokenizer, ChatMessage                              tokenization and chat format
    ModelConfig, TinyLM, load_model                         the built-in language model
    Adapter                                                 LoRA adapters as arrays
    SamplingParams, Generator, GENERATORS, create_generator generation backends by name
    BackendUnavailableError, ArtifactError, Artifacts       errors and shipped files
    Embedder, EmbedderConfig, EMBEDDERS, create_embedder    sentence embeddings
    check_precision, resolve_precision                      arithmetic of local training
    FinetuneConfig, FinetuneJob, finetune_adapters          LoRA fine-tuning, batched
    Tally, tally, examples_to_batches, torch_scored         evaluation (perplexity)
    OpenAIGenerator, PAD                                    a model server; the pad id
    bench_language_model, bench_embedder                    their benchmarks
"""

from __future__ import annotations

from typing import Any

from covey._lazy import lazy_attribute

_EXPORTS = {
    "load_corpus": "_data", "Corpus": "_data", "Example": "_data",
    "FederatedUser": "_data", "share_of": "_data",
    "ChatTokenizer": "_tokenizer", "ChatMessage": "_tokenizer",
    "ModelConfig": "_model", "TinyLM": "_model",
    "load_model": "_runtime",
    "Adapter": "_adapter",
    "SamplingParams": "_generate", "Generator": "_generate", "GENERATORS": "_generate",
    "create_generator": "_generate", "BackendUnavailableError": "_generate",
    "ArtifactError": "_artifacts", "Artifacts": "_artifacts",
    "Embedder": "_embedder", "EmbedderConfig": "_embedder", "EMBEDDERS": "_embedder",
    "create_embedder": "_embedder",
    "check_precision": "_precision", "resolve_precision": "_precision",
    "FinetuneConfig": "_finetune",
    "FinetuneJob": "_finetune",
    "OpenAIGenerator": "_generate",
    "PAD": "_tokenizer",
    "Tally": "_evaluate",
    "examples_to_batches": "_evaluate",
    "finetune_adapters": "_finetune",
    "bench_embedder": "_bench_embedder",
    "bench_language_model": "_bench",
    "tally": "_evaluate",
    "torch_scored": "_evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _EXPORTS, name, globals())


def __dir__() -> list[str]:
    return __all__
