"""The public / federated split of chitchat-dataset."""

from __future__ import annotations

from covey.models._data import is_public_eval, load_corpus, share_of


def test_split_is_stable_and_never_mixes_shares() -> None:
    corpus = load_corpus()
    assert share_of("some-user") == share_of("some-user")
    assert len(corpus.federated) > 500
    assert all(share_of(u.user_id) == "federated" for u in corpus.federated)
    stats = corpus.statistics()
    assert stats["federated_users_with_20_or_more"] >= 300
    assert 0.2 < stats["public_turns"] / (stats["public_turns"] + stats["federated_examples"]) < 0.5


def test_public_text_contains_no_federated_turn() -> None:
    corpus = load_corpus()
    federated_replies = {ex.reply for u in corpus.federated for ex in (*u.train, *u.test)}
    public = set(corpus.public_texts())
    # Short phrases ("hi", "lol") are said by everyone; long turns are one person's words.
    shared = {t for t in public & federated_replies if len(t) > 60}
    assert len(shared) <= 3, list(shared)[:3]


def test_eval_users_are_held_out() -> None:
    assert any(is_public_eval(f"user-{i}") for i in range(500))
    assert not any(is_public_eval(f"user-{i}") and share_of(f"user-{i}") == "federated"
                   for i in range(500))


def test_time_split_per_user() -> None:
    for user in load_corpus().federated:
        total = len(user.train) + len(user.test)
        # The last fifth (at least one) is test; a single example is all train.
        assert len(user.test) == (max(1, round(total * 0.2)) if total > 1 else 0)
        if user.train and user.test:
            assert max(e.timestamp for e in user.train) <= min(e.timestamp for e in user.test)
