"""The chat runtime: one turn = store, remember, recall, assemble, generate, store.

The same :class:`Assistant` serves `covey chat`, `covey serve` and the demo, so a turn
is remembered, explained and audited the same way whoever asked.

A turn touches the store in two steps only: :meth:`Assistant.respond` (the user's
message, what is learned from it, recall, the prompt) and :meth:`Turn.finish` (the
reply, in one transaction). Its pieces, generated between the two, touch only the
model, so a server can answer other requests while they come.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from covey.device._pod import Pod
from covey.device._stop import is_stopped
from covey.device.assistant._egress import RemoteGenerator
from covey.device.assistant._facts import extract_facts
from covey.device.assistant._orchestrator import (
    Counter,
    Explanation,
    PromptBudget,
    PromptParts,
    assemble,
    opening,
)
from covey.device.context._context import current_context, record_usage
from covey.device.memory._graph import PreferenceGraph
from covey.device.safety._safety import HOLDBACK, REFUSAL, WITHHELD, SafetyFilter, Verdict
from covey.device.store import _audit
from covey.errors import InvalidInputError
from covey.models import Generator, OpenAIGenerator, SamplingParams

__all__ = ["Assistant", "ChatConfig", "Turn"]

_log = logging.getLogger(__name__)
MAX_MESSAGE_CHARS = 8000


@dataclass(frozen=True)
class ChatConfig:
    """How the assistant answers and remembers."""

    recall_k: int = 4
    recent_turns: int = 8
    remember: bool = True
    budget: PromptBudget = field(default_factory=PromptBudget)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=48))

    def __post_init__(self) -> None:
        if not 0 <= self.recall_k <= 50:
            raise ValueError("recall_k must be in 0..50")
        if not 0 <= self.recent_turns <= 200:
            raise ValueError("recent_turns must be in 0..200")


@dataclass
class Turn:
    """A reply being generated: read :attr:`pieces`, then :meth:`finish` to store it.

    ``pieces`` touch only the model, never the store, so a server need not hold the
    store while they come. ``complete`` tells whether they ran to their end (also when
    cancelled or stopped: the reply is then partial); ``on_finish`` writes the turn.
    """

    pieces: Iterator[str]
    explanation: Explanation
    session_id: str
    user_message_id: int
    reply_message_id: int = 0
    text: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    complete: bool = False
    on_finish: Callable[[Turn], None] | None = field(default=None, repr=False)
    finished: bool = False

    def __iter__(self) -> Iterator[str]:
        """The pieces, then :meth:`finish`: for a reader that takes the whole reply in
        the thread that may use the store."""
        yield from self.pieces
        self.finish()

    def finish(self) -> None:
        """End the generation if it still runs, and store the reply (once).

        A reply whose pieces ran to their end (partial if cancelled or stopped) is
        stored with its explanation, in one transaction, and the next prompt's opening
        is primed. Pieces left unread (an error, a reader that gave up) store no reply.
        An output-filter verdict is audited either way.
        """
        if self.finished:
            return
        self.finished = True
        close = getattr(self.pieces, "close", None)
        if close is not None:
            close()  # frees the model; a no-op on pieces that ran to their end
        if self.on_finish is not None:
            self.on_finish(self)


class Assistant:
    """Answers a user in sessions, remembering what they say."""

    def __init__(self, pod: Pod, generator: Generator, count: Counter,
                 config: ChatConfig | None = None, model_version: str = "base",
                 safety: SafetyFilter | None = None) -> None:
        self.pod = pod
        self.safety = safety
        self._retrieved_verdicts: dict[str, bool] = {}  # text -> flagged, per assistant
        self.generator = generator
        # A generator that sends prompts off the process is gated (consent) and audited,
        # however the assistant was made.
        self.remote = (RemoteGenerator(pod, generator) if isinstance(generator, OpenAIGenerator)
                       else None)
        self.count = count
        self.config = config or ChatConfig()
        self.model_version = model_version
        self.graph = PreferenceGraph(pod.store)
        self._lock = threading.Lock()  # one generation at a time: the model is shared
        self._erasures = 0  # counts erasures, so that work begun before one is dropped
        self._worker: ThreadPoolExecutor | None = None
        self._priming: Future[Any] | None = None
        pod.memories.after_erasure(self._forget_cache)

    def _forget_cache(self) -> None:
        """Nothing derived from erased text stays in the generator's prefix cache."""
        self._erasures += 1  # a priming that read the erased text drops what it read
        self.settle()
        forget = getattr(self.generator, "forget_cache", None)
        if forget is not None:
            forget()

    def _background(self) -> ThreadPoolExecutor:
        """The thread that reads the next prompt's opening into the generator after a
        reply. It never touches the store."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="covey-assistant")
        return self._worker

    def settle(self) -> None:
        """Wait until the background work of the last turn is done."""
        priming = self._priming
        if priming is not None:
            priming.result()

    # -- sessions --------------------------------------------------------------------

    def new_session(self) -> str:
        """Start a session (a conversation); returns its id."""
        return self.pod.conversations.start()

    def last_session(self) -> str | None:
        """The most recent session, if any."""
        return self.pod.conversations.last_session()

    def recent_turns(self, limit: int) -> list[tuple[str, str]]:
        """The latest (role, text) turns across sessions, newest first (temporal layer)."""
        return self.pod.conversations.recent_turns(limit)

    # -- a turn ----------------------------------------------------------------------

    def respond(self, session_id: str, text: str, sampling: SamplingParams | None = None,
                cancel: threading.Event | None = None, to_program: bool = False) -> Turn:
        """Store the user's message, learn from it, and start the reply.

        Every read and write of the store the turn needs before its reply is done here;
        the caller reads the turn's pieces, then calls :meth:`Turn.finish`.
        ``to_program``: the reply goes to another program (the local API), so personal
        data is withheld from it. A message the safety filter blocks gets a refusal and
        is neither stored nor learned from.

        Raises:
            InvalidInputError: an empty or oversized message, or an unknown session.
            RemoteConsentError: the generator's server is off this machine and the user
                has not consented to sending it prompts (nothing is stored or sent).
        """
        text = text.strip()
        if not text:
            raise InvalidInputError("a message needs some text")
        if len(text) > MAX_MESSAGE_CHARS:
            raise InvalidInputError(f"a message holds at most {MAX_MESSAGE_CHARS} characters")
        if self.remote is not None:
            self.remote.allowed_by()
        timings: dict[str, float] = {}
        started = time.perf_counter()
        conversation = self.pod.conversations.conversation_id(session_id)
        if self.safety is not None:
            t_safety = time.perf_counter()
            verdict = self.safety.check_input(text)
            timings["safety_s"] = time.perf_counter() - t_safety
            if verdict.blocked:
                return self._refuse(session_id, verdict, timings)
        previous = self.recent_turns(self.config.recent_turns)
        self.pod.memories.prepare()  # the vector index is built before the write below
        message_id, learned = self._store_and_learn(conversation, text)
        timings["store_s"] = time.perf_counter() - started

        t0 = time.perf_counter()
        hits = self.pod.memories.recall(text, self.config.recall_k) if self.config.recall_k else []
        memories = [(h.memory.id, h.memory.text, h.score) for h in hits
                    if h.memory.id not in learned]
        timings["retrieve_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        prefs = [f.sentence() for f in self.graph.current()]
        record_usage(self.pod)  # only when the user enabled the routine source
        context = current_context(self.pod)
        t1 = time.perf_counter()
        memories, context, dropped = self._screen(memories, context)
        timings["safety_s"] = timings.get("safety_s", 0.0) + time.perf_counter() - t1
        parts = PromptParts(message=text, preferences=prefs, memories=memories,
                            context=context, turns=previous)
        messages, explanation = assemble(parts, self.config.budget, self.count)
        found = (self.pod.memories.get(m) for m in learned)
        explanation.learned.extend(memory.text for memory in found if memory is not None)
        if dropped:
            explanation.safety["dropped_injections"] = dropped
        timings["assemble_s"] = time.perf_counter() - t0
        turn = Turn(iter(()), explanation, session_id, message_id, timings=timings)
        params = sampling or self.config.sampling
        guard = _OutputGuard(self, turn, to_program) if self.safety is not None else None
        stream = (self.remote.stream_chat(messages, params, cancel, explanation)
                  if self.remote is not None
                  else self.generator.stream_chat(messages, params, cancel))
        turn.pieces = self._generate(turn, stream, guard)
        turn.on_finish = lambda done: self._store_reply(done, conversation, guard)
        return turn

    def _refuse(self, session_id: str, verdict: Verdict, timings: dict[str, float]) -> Turn:
        with self.pod.store.transaction() as c:
            _audit.append(c, "safety.blocked", detail={"stage": "input", **verdict.to_dict()})
        explanation = Explanation(safety={"stage": "input", **verdict.to_dict()})
        turn = Turn(iter((REFUSAL,)), explanation, session_id, 0, text=REFUSAL,
                    timings=timings)
        return turn

    def _screen(self, memories: list[tuple[int, str, float]], context: list[str]
                ) -> tuple[list[tuple[int, str, float]], list[str], int]:
        """Drop retrieved memories and context lines that carry prompt injection."""
        if self.safety is None:
            return memories, context, 0
        safety = self.safety

        def flagged(text: str) -> bool:
            if text not in self._retrieved_verdicts:
                if len(self._retrieved_verdicts) > 10_000:
                    self._retrieved_verdicts.clear()
                self._retrieved_verdicts[text] = safety.check_retrieved(text).blocked
            return self._retrieved_verdicts[text]

        kept_memories = [m for m in memories if not flagged(m[1])]
        kept_context = [line for line in context if not flagged(line)]
        dropped = len(memories) - len(kept_memories) + len(context) - len(kept_context)
        if dropped:
            self.pod.audit("safety.dropped", detail={"stage": "retrieved",
                                                     "category": "injection", "items": dropped})
        return kept_memories, kept_context, dropped

    def _store_and_learn(self, conversation: int, text: str) -> tuple[int, list[int]]:
        learned: list[int] = []
        with self.pod.store.transaction() as c:
            message_id = self.pod.conversations.add_user_message(c, conversation, text)
            if not self.config.remember:
                return message_id, learned
            for fact in extract_facts(text):
                memory_id = self.pod.memories.insert(c, fact.sentence, fact.kind, {
                    "source": "chat", "message_id": message_id, "relation": fact.relation})
                superseded = self.graph.assert_fact(c, fact, {"memory_id": memory_id,
                                                              "message_id": message_id})
                for old in superseded:
                    if old.get("memory_id") and old["memory_id"] != memory_id:
                        self.pod.memories.delete(c, int(old["memory_id"]))
                learned.append(memory_id)
        if learned:
            _log.info("learned %d memories from message %d", len(learned), message_id)
        return message_id, learned

    def _generate(self, turn: Turn, stream: Iterator[str], guard: _OutputGuard | None
                  ) -> Iterator[str]:
        """The reply's pieces as the guard releases them; the model alone is used."""
        t0 = time.perf_counter()
        pieces: list[str] = []
        erasures = self._erasures
        self.settle()  # the last reply's priming, if still reading, is waited for
        with self._lock:
            for piece in stream:
                if not pieces:
                    turn.timings["first_token_s"] = time.perf_counter() - t0
                pieces.append(piece)
                released = guard.feed(piece) if guard else piece
                if released:
                    yield released
                if guard and guard.blocked:
                    break
                if len(pieces) % 4 == 0 and is_stopped(self.pod.home):
                    turn.timings["stopped"] = 1.0  # `covey stop`: no further token
                    break
            if erasures != self._erasures:  # something was erased while this turn ran
                self._forget_cache()
        if guard:
            rest = guard.finish()
            if rest:
                yield rest
        turn.timings["reply_s"] = time.perf_counter() - t0
        turn.text = (guard.text if guard else "".join(pieces)).strip()
        turn.complete = True

    def _store_reply(self, turn: Turn, conversation: int, guard: _OutputGuard | None) -> None:
        """Write what the generation left to write, in one transaction: the output
        filter's verdict, and the reply with the use of its memories if it is complete."""
        blocked = guard.blocked if guard is not None else None
        if blocked is None and not turn.complete:
            return
        with self.pod.store.transaction() as c:
            if blocked is not None:
                _audit.append(c, "safety.blocked", detail={"stage": "output",
                                                           **blocked.to_dict()})
            if turn.complete:
                turn.reply_message_id = self.pod.conversations.add_reply(
                    c, conversation, turn.text, self.model_version, turn.explanation.to_dict())
                self.pod.memories.mark_used(c, [m["id"] for m in turn.explanation.memories])
        if turn.complete:
            self._prime_next()

    def _prime_next(self) -> None:
        """Have the generator read the next prompt's opening (system text, preferences,
        recent turns) now, in the background, instead of after the next message arrives."""
        if not hasattr(self.generator, "prime") or self.config.recent_turns == 0:
            return
        erasures = self._erasures  # before reading: an erasure after it is noticed
        prefs = [f.sentence() for f in self.graph.current()]
        head = opening(prefs, self.recent_turns(self.config.recent_turns),
                       self.config.budget, self.count)
        self._priming = self._background().submit(self._prime, head, erasures)

    def _prime(self, head: list[Any], erasures: int) -> None:
        if not self._lock.acquire(blocking=False):
            return  # a turn is being generated; it leaves its own prefix cached
        try:
            if erasures == self._erasures:
                self.generator.prime(head)
            if erasures != self._erasures:  # erased meanwhile: drop what was read
                self.generator.forget_cache()
        except Exception as exc:  # a cache miss, not an error of the turn
            _log.warning("could not prepare the next prompt (%s)", type(exc).__name__)
        finally:
            self._lock.release()

    # -- looking back ----------------------------------------------------------------

    def explain(self, message_id: int | None = None) -> dict[str, Any]:
        """Why a reply (default: the last one) was given."""
        reply = self.pod.conversations.reply(message_id)
        if reply is None:
            raise InvalidInputError("there is no reply to explain yet")
        explanation = reply.explanation
        for memory in explanation.get("memories", []):
            found = self.pod.memories.get(memory["id"])
            memory["text"] = found.text if found else "(forgotten since)"
        return {"message_id": reply.id, **explanation}

    def forget_last_message(self) -> int:
        """Erase the user's last message, its reply, and what was learned from it."""
        message_id = self.pod.conversations.last_user_message()
        if message_id is None:
            return 0
        with self.pod.store.transaction() as c:
            memories = self.pod.memories.learned_from(c, message_id)
            for memory_id in memories:
                self.pod.memories.delete(c, memory_id)
            erased = self.pod.conversations.erase_from(c, message_id)
            _audit.append(c, "erasure", detail={"table": "messages", "rows": erased,
                                                "memories": len(memories)})
        self.pod.store.checkpoint()
        self._forget_cache()
        return erased


class _OutputGuard:
    """Releases a reply as it is checked, holding back its last ``HOLDBACK`` characters:
    when the filter objects, what it objected to was never sent."""

    def __init__(self, assistant: Assistant, turn: Turn, to_program: bool) -> None:
        if assistant.safety is None:
            raise ValueError("an output guard needs the assistant's safety filter")
        self.safety, self.turn, self.to_program = assistant.safety, turn, to_program
        self.private = ([f.value for f in assistant.graph.current()] if to_program else [])
        self.generated = ""
        self.released = 0
        self.blocked: Verdict | None = None
        self.notice = ""
        self.checks = 0
        self.checked = 0  # how much of the reply was checked for personal data

    @property
    def text(self) -> str:
        return self.generated[:self.released] + self.notice

    def _check(self, final: bool) -> None:
        t0 = time.perf_counter()
        verdict = None
        if self.to_program and (final or self.checks % 4 == 0):
            # Personal data is local: the unreleased tail, with some context before it.
            window = self.generated if final else self.generated[max(0, self.released - 64):]
            verdict = self.safety.check_personal_data(window, self.private)
            self.checked = len(self.generated)
        if verdict is None and (final or self.checks % 12 == 0):
            verdict = self.safety.classify(self.generated, ("harm",))
        self.turn.timings["safety_s"] = self.turn.timings.get("safety_s", 0.0) + \
            time.perf_counter() - t0
        if verdict is not None and verdict.blocked:
            self.blocked = verdict
            self.notice = (" " if self.released else "") + (
                WITHHELD if verdict.category == "personal_data" else REFUSAL)
            # Audited when the turn finishes: the guard runs beside the model, off the store.
            self.turn.explanation.safety.update({"stage": "output", **verdict.to_dict()})

    def feed(self, piece: str) -> str:
        self.generated += piece
        self.checks += 1
        self._check(final=False)
        if self.blocked:
            return self.notice
        # Only text checked for personal data, and HOLDBACK behind it, is released.
        checked = self.checked if self.to_program else len(self.generated)
        upto = max(self.released, checked - HOLDBACK)
        out, self.released = self.generated[self.released:upto], upto
        return out

    def finish(self) -> str:
        if self.blocked:
            return ""
        self._check(final=True)
        if self.blocked:
            return self.notice
        out, self.released = self.generated[self.released:], len(self.generated)
        return out


def enable_semantic_memory(pod: Pod, progress: Any = None) -> None:
    """Load the embedder (exporting it once, with a message) and turn on semantic recall."""
    from covey.models import create_embedder

    pod.memories.use_embedder(create_embedder("minilm-onnx", progress=progress))


def open_assistant(pod: Pod, generator: str | None = None, url: str | None = None,
                   model: str = "default", embeddings: bool = True,
                   config: ChatConfig | None = None, progress: Any = None) -> Assistant:
    """An assistant for ``pod``: the generator by name (``COVEY_GENERATOR``, default
    ``onnx``; ``openai`` takes ``url`` or ``COVEY_OPENAI_URL``) and semantic memory.

    Raises:
        RemoteConsentError: ``openai`` with a server off this machine, without consent.
    """
    import os

    from covey.models import Artifacts, ChatTokenizer, create_generator

    name = generator or os.environ.get("COVEY_GENERATOR", "onnx")
    options: dict[str, Any] = {}
    if name == "openai":
        options = {"base_url": url or os.environ.get("COVEY_OPENAI_URL", ""), "model": model}
    gen = create_generator(name, **options)
    if isinstance(gen, OpenAIGenerator):  # refused before anything loads, not at the turn
        RemoteGenerator(pod, gen).allowed_by()
    artifacts = Artifacts.load(verify=False)
    tokenizer = ChatTokenizer.from_file(artifacts.path("tokenizer.json"))
    if embeddings:
        enable_semantic_memory(pod, progress)
    version = artifacts.card["files"]["lm-int8.onnx"]["sha256"][:12]
    return Assistant(pod, gen, lambda text: len(tokenizer.encode(text)), config,
                     model_version=f"{name}:{version}" if name != "openai" else f"openai:{model}",
                     safety=SafetyFilter.load())
