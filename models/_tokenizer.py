"""A byte-level BPE tokenizer with chat special tokens, trained on the public share.

Byte-level means any text encodes without an unknown token. User text is encoded with
special-token matching off, so a user typing ``<|system|>`` gets those characters, not
the control token: only :meth:`ChatTokenizer.render` places special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["SPECIAL_TOKENS", "ChatMessage", "ChatTokenizer", "train_tokenizer"]

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>")
PAD, BOS, EOS, USER, ASSISTANT, SYSTEM = range(len(SPECIAL_TOKENS))
_ROLE_TOKEN = {"user": USER, "assistant": ASSISTANT, "system": SYSTEM}


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat: ``role`` is system, user or assistant."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in _ROLE_TOKEN:
            raise ValueError(f"role must be one of {', '.join(_ROLE_TOKEN)}, got {self.role!r}")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (deterministic for the same input)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


class ChatTokenizer:
    """Encodes user text safely and renders chats in the model's format.

    A chat renders as ``<|bos|> <|user|> text <|eos|> <|assistant|> text <|eos|> ...``:
    every turn ends with ``<|eos|>``, so the model learns where its own turn ends. A reply
    to generate starts after a trailing ``<|assistant|>``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._tok.encode_special_tokens = True
        for i, name in enumerate(SPECIAL_TOKENS):
            if self._tok.token_to_id(name) != i:
                raise ValueError(f"tokenizer lacks special token {name} at id {i}")

    @classmethod
    def from_file(cls, path: Path) -> ChatTokenizer:
        """Load a saved tokenizer."""
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: Path) -> None:
        """Save as a `tokenizers` JSON file."""
        self._tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return int(self._tok.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (special-token strings stay ordinary characters)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (parallel)."""
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens dropped."""
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def render(self, messages: Sequence[ChatMessage], reply: bool = True) -> list[int]:
        """Ids of a chat; with ``reply`` the ids end with ``<|assistant|>`` to prompt a reply."""
        ids = [BOS]
        for message in messages:
            ids.append(_ROLE_TOKEN[message.role])
            ids.extend(self.encode(message.content))
            ids.append(EOS)
        if reply:
            ids.append(ASSISTANT)
        return ids

    def example(self, context: str, reply: str) -> tuple[list[int], int]:
        """Ids of a (context, reply) example and where the reply's tokens start.

        The loss of a reply is measured on its tokens and the closing ``<|eos|>``.
        """
        ids = [BOS]
        if context:
            ids += [USER, *self.encode(context), EOS]
        ids.append(ASSISTANT)
        start = len(ids)
        ids += [*self.encode(reply), EOS]
        return ids, start
