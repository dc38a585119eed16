"""The pod at work: remembering across sessions, preference updates, feedback, forgetting."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from covey.device import Pod
from covey.device.assistant._chat import Assistant, open_assistant
from covey.device.assistant._facts import extract_facts
from covey.device.assistant._feedback import give_feedback, set_consent
from covey.device.assistant._orchestrator import opening
from covey.errors import InvalidInputError
from covey.models import SamplingParams
from tests.conftest import Covey

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def _say(assistant: Assistant, session: str, text: str) -> tuple[str, dict]:
    turn = assistant.respond(session, text, sampling=GREEDY)
    reply = "".join(turn)
    return reply, assistant.explain(turn.reply_message_id)


@pytest.fixture
def assistant(pod: Pod) -> Assistant:
    return open_assistant(pod)


def test_fact_from_one_session_is_used_in_a_later_one(assistant: Assistant) -> None:
    first = assistant.new_session()
    _, why = _say(assistant, first, "My sister is Ana and I live in Lisbon.")
    assert why["learned"] == ["My sister is Ana.", "I live in Lisbon."]
    later = assistant.new_session()
    _say(assistant, later, "hello again")
    reply, why = _say(assistant, later, "what do you know about my sister?")
    assert isinstance(reply, str)
    assert "sister: Ana" in why["preferences"]
    assert any(m["text"] == "My sister is Ana." for m in why["memories"])
    assert why["tokens"]["memories"] <= assistant.config.budget.memories


def _holds(ids: list[int], part: list[int]) -> bool:
    return any(ids[i:i + len(part)] == part for i in range(len(ids)))


def test_forgotten_memory_is_never_recalled_again(assistant: Assistant) -> None:
    session = assistant.new_session()
    _, why = _say(assistant, session, "My favorite color is teal.")
    memory = assistant.pod.memories.recall("favorite color", 3)[0].memory
    assert memory.text == "My favorite color is teal."
    teal = assistant.generator.tokenizer.encode(" teal")
    assert _holds(assistant.generator._prefix.ids, teal)  # the last prompt had it
    assert assistant.pod.memories.forget(memory.id)
    assert assistant.generator._prefix is None  # no cached keys and values of it either
    assert all(h.memory.id != memory.id for h in assistant.pod.memories.recall("color", 5))
    assert assistant.graph.lookup("favorite_color") is None
    _, why = _say(assistant, session, "what is my favorite color?")
    assert not any("teal" in p for p in why["preferences"])
    assert not any(m["id"] == memory.id for m in why["memories"])


def test_the_next_prompts_opening_is_read_before_the_message_comes(
        assistant: Assistant) -> None:
    session = assistant.new_session()
    _say(assistant, session, "I like jazz.")
    _say(assistant, session, "hi there")
    assistant.settle()
    generator = assistant.generator
    head = opening([f.sentence() for f in assistant.graph.current()],
                   assistant.recent_turns(assistant.config.recent_turns),
                   assistant.config.budget, assistant.count)
    assert "likes jazz" in head[0].content and head[-1].role == "assistant"
    primed = generator.tokenizer.render(head, reply=False)
    assert generator._prefix.ids == primed
    _, why = _say(assistant, session, "tell me something fun")
    assert not why["learned"]  # so the preferences, and the opening, are as primed
    # Only what this message recalled and the message itself were read after it came.
    assert generator.usage["cached_tokens"] == len(primed)


def test_erasure_drops_a_primed_opening(assistant: Assistant) -> None:
    session = assistant.new_session()
    _say(assistant, session, "My favorite color is teal.")
    memory = assistant.pod.memories.recall("favorite color", 1)[0].memory
    # The forget may land while the next opening (which holds the message) is being
    # read: it waits for that, then drops it.
    assert assistant.pod.memories.forget(memory.id)
    assert assistant.generator._prefix is None
    assistant.settle()
    assert assistant.generator._prefix is None


def test_newer_preference_replaces_the_older(assistant: Assistant) -> None:
    session = assistant.new_session()
    _say(assistant, session, "I love coffee in the morning.")
    _say(assistant, session, "Actually I hate coffee in the morning.")
    tastes = [(f.relation, f.value) for f in assistant.graph.current()]
    assert tastes == [("dislikes", "coffee in the morning")]
    texts = [m.text for m in assistant.pod.memories.all()]
    assert "I dislike coffee in the morning." in texts
    assert "I like coffee in the morning." not in texts
    # Functional facts: a new value replaces the old one.
    _say(assistant, session, "I live in Porto.")
    _say(assistant, session, "I live in Braga now.")
    assert assistant.graph.lookup("lives_in").value == "Braga"
    # "now" is about time, not taste: it still replaces the earlier preference
    _say(assistant, session, "I love spicy food.")
    _say(assistant, session, "actually I hate spicy food now.")
    spicy = [(f.relation, f.value) for f in assistant.graph.current() if "spicy" in f.value]
    assert spicy == [("dislikes", "spicy food")]


def test_near_duplicates_merge(assistant: Assistant) -> None:
    a = assistant.pod.memories.add("I go swimming every Tuesday morning", kind="fact")
    b = assistant.pod.memories.add("I go swimming every Tuesday morning.", kind="fact")
    assert a.id == b.id
    assert assistant.pod.memories.count() == 1


def test_feedback_makes_training_examples(assistant: Assistant) -> None:
    session = assistant.new_session()
    _say(assistant, session, "hi there")
    up = give_feedback(assistant.pod, rating=1)
    assert up.example_id is not None and not up.consented
    set_consent(assistant.pod, "federated_training", True)
    _say(assistant, session, "what should I cook tonight?")
    fixed = give_feedback(assistant.pod, correction="Try a mushroom risotto.")
    down = give_feedback(assistant.pod, rating=-1)
    assert fixed.consented and down.example_id is None
    rows = assistant.pod.store.query(
        "SELECT prompt, target, source, consented FROM training_examples ORDER BY id")
    assert [tuple(r) for r in rows][1] == ("what should I cook tonight?",
                                          "Try a mushroom risotto.", "correction", 1)
    assert rows[0]["source"] == "accepted" and rows[0]["consented"] == 0
    with pytest.raises(InvalidInputError):
        give_feedback(assistant.pod)


def test_forget_last_message(assistant: Assistant) -> None:
    session = assistant.new_session()
    _say(assistant, session, "My dog is Bolt.")
    assert assistant.graph.lookup("dog") is not None
    assert assistant.generator._prefix is not None
    assert assistant.forget_last_message() == 2  # the message and its reply
    assert assistant.generator._prefix is None
    assert assistant.graph.lookup("dog") is None
    assert assistant.pod.memories.count() == 0
    assert assistant.pod.export()["audit_log"][-1]["kind"] == "erasure"


@pytest.mark.parametrize(("text", "expected"), [
    ("my day is fine", []),
    ("I like it", []),
    ("Call me Jo, I work at the bakery", [("name", "Jo"), ("works_at", "the bakery")]),
    ("I'm allergic to peanuts", [("allergic_to", "peanuts")]),
    ("I like jazz a lot these days", [("likes", "jazz")]),
])
def test_fact_patterns(text: str, expected: list[tuple[str, str]]) -> None:
    assert [(f.relation, f.value) for f in extract_facts(text)] == expected


def test_chat_cli(covey: Covey, home: Path) -> None:
    h = ("--home", str(home))
    assert covey("pod", "init", *h).returncode == 0
    first = covey("chat", "My brother is Tom.", *h, "--json", "--seed", "1")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["learned"] == ["My brother is Tom."]
    later = covey("chat", "tell me about my brother", "--new", "--explain", *h, "--json")
    explanation = json.loads(later.stdout)["explanation"]
    assert "brother: Tom" in explanation["preferences"]
    assert covey("feedback", "--correct", "Your brother is Tom.", *h).returncode == 0
    bad = covey("feedback", "--up", "--down", *h)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def _replies(assistant: Assistant) -> int:
    return int(assistant.pod.store.query(
        "SELECT count(*) FROM messages WHERE role = 'assistant'")[0][0])


def test_the_pieces_store_nothing_and_finish_stores_the_reply(assistant: Assistant) -> None:
    turn = assistant.respond(assistant.new_session(), "hello there", sampling=GREEDY)
    text = "".join(turn.pieces)
    assert turn.complete and _replies(assistant) == 0  # the model alone was used
    turn.finish()
    turn.finish()  # once
    assert _replies(assistant) == 1 and turn.reply_message_id > 0
    assert assistant.explain()["message_id"] == turn.reply_message_id
    assert text.strip() == turn.text


def test_a_cancelled_turn_keeps_its_partial_reply(assistant: Assistant) -> None:
    cancel = threading.Event()
    long = SamplingParams(max_tokens=40, temperature=0.0)
    turn = assistant.respond(assistant.new_session(), "tell me a story", long, cancel)
    cancel.set()  # the client went away, or Ctrl-C: the model stops at its next token
    text = "".join(turn.pieces)
    turn.finish()
    assert assistant.generator.finish_reason == "cancelled"
    assert turn.complete and turn.reply_message_id > 0 and turn.text == text.strip()
    assert assistant.explain()["message_id"] == turn.reply_message_id


def test_a_turn_left_unread_stores_no_reply(assistant: Assistant) -> None:
    turn = assistant.respond(assistant.new_session(), "hello there", sampling=GREEDY)
    next(iter(turn.pieces))
    turn.finish()  # e.g. after an error: the generation ends, the model is free
    assert not turn.complete and turn.reply_message_id == 0 and _replies(assistant) == 0
    assert "".join(assistant.respond(assistant.last_session() or "", "hi again",
                                     sampling=GREEDY))  # the model is not held
    assert _replies(assistant) == 1
