"""Conversations: sessions and their messages, every statement on those tables."""

from __future__ import annotations

import pytest

from covey.device import Pod
from covey.errors import InvalidInputError


def test_sessions_start_and_are_found(pod: Pod) -> None:
    history = pod.conversations
    assert history.last_session() is None
    first = history.start()
    assert first.startswith("s-") and history.exists(first)
    assert history.start("named-1") == "named-1"
    assert history.last_session() == "named-1"
    assert not history.exists("never")
    with pytest.raises(InvalidInputError):
        history.conversation_id("never")


def test_messages_replies_and_erasure(pod: Pod) -> None:
    history = pod.conversations
    conv = history.conversation_id(history.start())
    with pod.store.transaction() as c:
        asked = history.add_user_message(c, conv, "any tips for tea?")
        answered = history.add_reply(c, conv, "Green tea at 80 C.", "base", {"turns": 1})
    assert history.recent_turns(5) == [("assistant", "Green tea at 80 C."),
                                       ("user", "any tips for tea?")]
    reply = history.reply()
    assert reply is not None and reply.id == answered and reply.explanation == {"turns": 1}
    assert history.reply(asked) is None  # a user's message is no reply
    assert history.prompt_of(reply) == "any tips for tea?"
    assert history.last_user_message() == asked
    assert history.count() == 2 and history.cutoff(1) == asked
    assert history.conversations_up_to(asked) == [conv]
    assert history.user_texts(conv, answered) == ["any tips for tea?"]
    with pod.store.transaction() as c:
        assert history.erase_from(c, asked) == 2
    assert history.count() == 0 and history.reply() is None
