"""On-device models: tokenizer, language model, adapters, ONNX runtime, embedder.

Nothing is public yet; see the open issue for the built-in models.
"""

__all__: list[str] = []
