"""A pod in a federated round: consent, signature, budget, ledger; the client training
function; and whole runs of the aggregator over in-process pods (faults included)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from covey.aggregator._registry import Registry
from covey.aggregator._rounds import PodReply, RunConfig, run_federated
from covey.device import Pod
from covey.device.assistant._feedback import TRAINING_CONSENT, set_consent
from covey.device.federation._budget import pod_ledger
from covey.device.federation._federated import train_update
from covey.device.federation._participation import (
    RoundRefused,
    RoundRequest,
    budget_policy,
    import_examples,
    set_budget_policy,
    spent,
    take_part,
)
from covey.models import Adapter, load_corpus, load_model
from covey.models._finetune import FinetuneConfig
from covey.privacy import DPConfig, GaussianRounds, epsilon_spent
from covey.protocols import RoundMessage
from covey.simulations._in_process import PEER, InProcessTransport, PodClient
from tests.conftest import FAST_CONFIG, PASSPHRASE


@pytest.fixture(scope="module")
def lm() -> tuple[Any, Any]:
    model, tok, _ = load_model()
    return model, tok


@pytest.fixture(scope="module")
def users() -> list[Any]:
    return [u for u in load_corpus().federated if len(u.train) >= 20][:4]


@pytest.fixture
def registry(tmp_path: Path, lm: tuple[Any, Any]) -> Registry:
    import torch

    from covey.models import TinyLM

    reg = Registry(tmp_path / "registry")
    torch.manual_seed(0)
    initial = Adapter.zeros_like(TinyLM(lm[0].cfg)).to_bytes()
    v, _ = reg.add(initial, parent=None, round=0, run_id="init", metrics={"perplexity": 100.0},
                   epsilon=0.0)
    reg.activate(v.id)
    return reg


def _pod(tmp_path: Path, name: str, examples: list[Any], consent: bool = True) -> Path:
    home = tmp_path / name
    with Pod.create(home, PASSPHRASE, name=name, config=FAST_CONFIG) as pod:
        set_consent(pod, TRAINING_CONSENT, consent)
        import_examples(pod, examples[:24])
    return home


def _asked(payload: RoundMessage) -> RoundRequest:
    """``payload`` as an in-process pod receives it."""
    return RoundRequest.received(payload, PEER)


def _payload(registry: Registry, dp: DPConfig, rnd: int = 1, planned: int = 3,
             run_id: str = "run-a") -> RoundMessage:
    """A round as the aggregator sends it: the version and the settings signed."""
    from dataclasses import replace

    version, data, signature = registry.get(str(registry.current_id))
    payload = RoundMessage(run_id, rnd, planned, dp, json.loads(version.canonical()),
                           signature, data, 1, 5e-3, 16, rnd)
    return replace(payload, round_signature=registry.sign_round(payload.settings()))


CENTRAL = DPConfig(mode="central", noise_multiplier=1.0, clip_norm=0.5, sample_rate=0.5)


def _segments(pod: Pod) -> list[GaussianRounds]:
    """What the user's ledger composes."""
    return [s for e in pod_ledger(pod).history() if (s := e.release.segment())]


def test_train_update_is_clipped_and_learns(lm: tuple[Any, Any], users: list[Any]) -> None:
    model, tok = lm
    import torch

    from covey.models import TinyLM

    torch.manual_seed(0)
    adapter = Adapter.zeros_like(TinyLM(model.cfg))
    examples = users[0].train[:32]
    cfg = FinetuneConfig(epochs=2, lr=5e-3, seed=1)
    update = train_update(model, tok, examples, adapter, cfg,
                          DPConfig(noise_multiplier=1.0, clip_norm=1e9))
    assert update.loss_after < update.loss_before  # it learned from the examples
    clipped = train_update(model, tok, examples, adapter, cfg, CENTRAL)
    assert float(np.linalg.norm(clipped.delta)) == pytest.approx(0.5, rel=1e-4)
    assert clipped.clipped and clipped.delta.dtype == np.float32
    np.testing.assert_allclose(clipped.delta, update.delta * (0.5 / update.norm), rtol=1e-4,
                               atol=1e-7)  # deterministic for a seed
    local = DPConfig(mode="local", noise_multiplier=2.0, clip_norm=0.5)
    noised = train_update(model, tok, examples, adapter, cfg, local)
    noise = noised.delta - clipped.delta
    assert float(noise.std()) == pytest.approx(1.0, rel=0.03)  # z * C on the device
    assert update.nbytes == adapter.nbytes <= 512 * 1024


def test_take_part_charges_the_planned_run_once_and_audits(
        tmp_path: Path, lm: tuple[Any, Any], users: list[Any], registry: Registry) -> None:
    home = _pod(tmp_path, "pod", users[0].train)
    with Pod.open(home, PASSPHRASE) as pod:
        for rnd in (1, 2):
            update, eps = take_part(pod, _asked(_payload(registry, CENTRAL, rnd)),
                                    *lm, registry.public_key)
        expected = epsilon_spent([GaussianRounds(1.0, 0.5, 3)], 1e-5)
        assert eps == pytest.approx(expected)
        assert _segments(pod) == [GaussianRounds(1.0, 0.5, 3)]
        assert spent(pod) == pytest.approx(expected)
        rows = pod.store.query("SELECT kind, bytes, epsilon, detail FROM audit_log"
                               " WHERE kind = 'federated_update'")
        assert [r[1] for r in rows] == [update.nbytes] * 2
        assert all(json.loads(r[3])["mode"] == "central" for r in rows)
        assert pod.verify_audit_chain().ok
        # local mode: every participation is one unamplified release
        local = DPConfig(mode="local", noise_multiplier=3.0, clip_norm=0.5)
        take_part(pod, _asked(_payload(registry, local, 1, run_id="run-b")), *lm,
                  registry.public_key)
        # at the replace-one sensitivity 2C: noise 3C is 1.5 times the sensitivity
        assert _segments(pod)[-1] == GaussianRounds(1.5, 1.0, 1)


def test_refusals_record_nothing(tmp_path: Path, lm: tuple[Any, Any], users: list[Any],
                                 registry: Registry) -> None:
    home = _pod(tmp_path, "pod", users[1].train)
    no_consent = _pod(tmp_path, "shy", users[2].train, consent=False)
    with Pod.open(no_consent, PASSPHRASE) as pod:
        with pytest.raises(RoundRefused, match="consented") as info:
            take_part(pod, _asked(_payload(registry, CENTRAL)), *lm, registry.public_key)
        assert info.value.code == "no_consent"
    with Pod.open(home, PASSPHRASE) as pod:
        before = pod.store.query("SELECT COUNT(*) FROM audit_log")[0][0]
        # a version signed by another key
        other = Registry(tmp_path / "evil")
        with pytest.raises(RoundRefused) as info:
            take_part(pod, _asked(_payload(registry, CENTRAL)), *lm, other.public_key)
        assert info.value.code == "bad_signature"
        # a round without noise gives no guarantee: refused
        with pytest.raises(RoundRefused) as info:
            take_part(pod, _asked(_payload(registry, DPConfig(noise_multiplier=0.0))),
                      *lm, registry.public_key)
        assert info.value.code == "not_private"
        # the budget: a run that would exceed the user's maximum is refused
        set_budget_policy(pod, 1.0)
        with pytest.raises(RoundRefused, match="exceed the user's privacy budget") as info:
            take_part(pod, _asked(_payload(registry, CENTRAL)), *lm, registry.public_key)
        assert info.value.code == "budget_exhausted"
        # the refusal travels to the aggregator: it tells no epsilon, spent or maximum
        assert not any(ch.isdigit() for ch in str(info.value))
        assert pod.store.query("SELECT COUNT(*) FROM privacy_ledger")[0][0] == 0
        after = pod.store.query("SELECT COUNT(*) FROM audit_log")[0][0]
        assert after == before + 1  # only the budget change itself
        assert budget_policy(pod).max_epsilon == 1.0


def _clients(tmp_path: Path, lm: tuple[Any, Any], users: list[Any], registry: Registry,
             n: int) -> dict[int, PodClient]:
    return {i + 1: PodClient(_pod(tmp_path, f"pod{i}", users[i].train), PASSPHRASE, *lm,
                             registry.public_key) for i in range(n)}


def _evaluator(ppl: list[float]) -> Any:
    def evaluate(_: bytes) -> dict[str, float]:
        return {"perplexity": ppl.pop(0) if ppl else 100.0}
    return evaluate


def test_a_run_survives_a_malformed_update_a_dropout_and_a_pod_at_budget(
        tmp_path: Path, lm: tuple[Any, Any], users: list[Any], registry: Registry) -> None:
    clients: dict[int, Any] = _clients(tmp_path, lm, users, registry, 3)
    with Pod.open(clients[3].home, PASSPHRASE) as pod:
        set_budget_policy(pod, 0.5)  # this user allows almost nothing

    def malformed(node: int, payload: RoundMessage) -> PodReply:
        return PodReply(node, values=np.full(49152, np.nan, np.float32),
                        version=str(payload.version["id"]), examples=5)

    def dropout(node: int, payload: RoundMessage) -> PodReply:
        time.sleep(30)  # gone mid-round
        return PodReply(node, refusal="late")

    clients[4], clients[5] = malformed, dropout
    everyone = DPConfig(mode="central", noise_multiplier=1.0, clip_norm=0.5, sample_rate=1.0)
    cfg = RunConfig(rounds=2, dp=everyone, min_pods=2, round_timeout=6.0, wait_timeout=5.0)
    started = time.monotonic()
    record = run_federated(InProcessTransport(clients), registry, cfg, "run-faults",
                           _evaluator([101.0, 99.0]), tmp_path / "run.json")
    assert time.monotonic() - started < 2 * 6.0 + 20  # each round ended at its timeout
    assert record["status"] == "completed"
    assert len(record["rounds"]) == 2
    for stats in record["rounds"]:
        # every sampled pod is accounted for: accepted, rejected, refused or timed out
        assert stats["sampled"] == (stats["accepted"] + sum(stats["rejected"].values())
                                    + sum(stats["refused"].values()) + stats["timed_out"])
        assert stats["rejected"] in ({}, {"non_finite": 1})
        assert stats["refused"] in ({}, {"budget_exhausted": 1})
        assert stats["timed_out"] in (0, 1)
    for stats in record["rounds"]:  # with q = 1 every fault happens in every round
        assert stats["rejected"] == {"non_finite": 1}
        assert stats["refused"] == {"budget_exhausted": 1}
        assert stats["timed_out"] == 1 and stats["accepted"] == 2
    assert record["epsilon"] == pytest.approx(epsilon_spent([GaussianRounds(1.0, 1.0, 2)],
                                                            1e-5))
    with Pod.open(clients[3].home, PASSPHRASE) as pod:
        assert pod.store.query("SELECT COUNT(*) FROM privacy_ledger")[0][0] == 0


def test_rollback_when_quality_drops_more_than_ten_percent(
        tmp_path: Path, lm: tuple[Any, Any], users: list[Any], registry: Registry) -> None:
    clients = _clients(tmp_path, lm, users, registry, 2)
    start = registry.current_id
    dp = DPConfig(mode="central", noise_multiplier=1.5, clip_norm=0.5, sample_rate=1.0)
    cfg = RunConfig(rounds=3, dp=dp, min_pods=2, round_timeout=60.0)
    # round 1 better than the start (100), round 2 15 % worse than the best, round 3 ok
    record = run_federated(InProcessTransport(clients), registry, cfg, "run-rb",
                           _evaluator([90.0, 103.5, 95.0]), tmp_path / "run.json")
    r1, r2, r3 = record["rounds"]
    assert "rolled_back_to" not in r1
    assert r2["rolled_back_to"] == r1["version"]
    assert "rolled_back_to" not in r3
    assert registry.get(r3["version"])[0].parent == r1["version"]  # trained from the rollback
    assert record["final_version"] == r3["version"] != start
    assert math.isfinite(record["epsilon"]) and record["epsilon_check"]["accountant"] == "prv"


def test_adaptive_clipping_moves_c_at_no_extra_epsilon(
        tmp_path: Path, lm: tuple[Any, Any], users: list[Any], registry: Registry) -> None:
    from covey.privacy import AdaptiveClipping

    clients = _clients(tmp_path, lm, users, registry, 2)
    fixed = DPConfig(mode="central", noise_multiplier=2.0, clip_norm=1e-3)
    adaptive = DPConfig(mode="central", noise_multiplier=2.0, clip_norm=1e-3,
                        adaptive=AdaptiveClipping(target_quantile=0.5, count_noise=5.0))
    record = run_federated(InProcessTransport(clients), registry,
                           RunConfig(rounds=3, dp=adaptive, min_pods=2), "run-ad",
                           _evaluator([]), tmp_path / "run.json")
    clips = [r["clip_norm"] for r in record["rounds"]]
    assert clips[0] == 1e-3 and len(set(clips)) == 3  # C moves every round
    plain = run_federated(InProcessTransport(clients), registry,
                          RunConfig(rounds=3, dp=fixed, min_pods=2), "run-fx",
                          _evaluator([]), tmp_path / "run2.json")
    assert record["epsilon"] == pytest.approx(plain["epsilon"])
    assert "adaptive" in record["mechanism"]["clipping"]
    # The record states the noise the update got, not z: the count took a share of it,
    # and the two shares recombine to the z the accountant composed.
    split = record["mechanism"]["noise_split"]
    z_u, count_z = split["update_noise_multiplier"], split["count_noise_std"] / 0.5
    assert z_u > 2.0 and count_z == pytest.approx(10.0)
    assert (z_u ** -2 + count_z ** -2) ** -0.5 == pytest.approx(2.0)
    assert f"z_u={z_u:.6g}" in record["mechanism"]["noise"]


def test_the_round_message_carries_the_training_precision(registry: Registry) -> None:
    from dataclasses import replace

    from covey.aggregator._serverapp import round_record

    payload = replace(_payload(registry, CENTRAL), precision="bf16")
    config = dict(round_record(payload).config_records["round"])
    assert RoundRequest.from_dict(config, peer="peer").precision == "bf16"
    # An older aggregator sends no precision: the pod trains in fp32.
    assert RoundRequest.from_dict({k: v for k, v in config.items() if k != "precision"},
                                  peer="peer").precision == "fp32"
    with pytest.raises(ValueError, match="precision"):  # the pod refuses it as malformed
        RoundRequest.from_dict({**config, "precision": "fp8"}, peer="peer")
    with pytest.raises(ValueError, match="precision"):
        RunConfig(precision="fp16")


def test_a_local_pod_without_examples_sends_noise_not_a_refusal(
        tmp_path: Path, lm: tuple[Any, Any], registry: Registry) -> None:
    # A refusal would tell the (untrusted) aggregator that the user has no data: in
    # local mode the pod sends noise alone, and the release is charged like any other.
    home = _pod(tmp_path, "empty", [])
    local = DPConfig(mode="local", noise_multiplier=2.0, clip_norm=0.5)
    with Pod.open(home, PASSPHRASE) as pod:
        update, eps = take_part(pod, _asked(_payload(registry, local, 1, 1, "run-l")),
                                *lm, registry.public_key)
        assert float(update.delta.std()) == pytest.approx(1.0, rel=0.03)  # z * C
        assert update.reported(local) == {"examples": 0, "clipped": 0}
        assert eps == pytest.approx(epsilon_spent([GaussianRounds(1.0, 1.0, 1)], 1e-5))
        # central mode trusts the aggregator with that: the pod says it has nothing
        with pytest.raises(RoundRefused) as info:
            take_part(pod, _asked(_payload(registry, CENTRAL)), *lm, registry.public_key)
        assert info.value.code == "no_examples"


def test_a_run_that_changes_its_noise_is_refused(
        tmp_path: Path, lm: tuple[Any, Any], users: list[Any], registry: Registry) -> None:
    from dataclasses import replace

    home = _pod(tmp_path, "pod", users[0].train)
    with Pod.open(home, PASSPHRASE) as pod:
        take_part(pod, _asked(_payload(registry, CENTRAL, 1)), *lm, registry.public_key)
        less_noise = replace(CENTRAL, noise_multiplier=0.3)
        with pytest.raises(RoundRefused) as info:
            take_part(pod, _asked(_payload(registry, less_noise, 2)), *lm,
                      registry.public_key)
        assert info.value.code == "run_changed" and "noise multiplier" in str(info.value)
        more_rounds = _asked(_payload(registry, CENTRAL, 2, planned=50))
        with pytest.raises(RoundRefused) as info:
            take_part(pod, more_rounds, *lm, registry.public_key)
        assert info.value.code == "run_changed"
        assert len(pod_ledger(pod).history()) == 1


def test_every_pod_that_could_be_sampled_is_charged_the_run(
        tmp_path: Path, lm: tuple[Any, Any], users: list[Any], registry: Registry) -> None:
    # Amplification by sampling holds over the draw: a pod the draw never picks still
    # carries the run's (z, q, T). Charging only the sampled ones would count the sampling
    # discount twice (10,000 one-round runs at q = 0.01, z = 1: 6.71 true, 1.21 charged).
    clients = _clients(tmp_path, lm, users, registry, 4)
    dp = DPConfig(mode="central", noise_multiplier=1.0, clip_norm=0.5, sample_rate=0.05)
    cfg = RunConfig(rounds=2, dp=dp, min_pods=1, round_timeout=60.0)
    record = run_federated(InProcessTransport(clients), registry, cfg, "run-q",
                           _evaluator([]), tmp_path / "run.json")
    assert record["announced"] == {"pods": 4, "charged": 4, "refused": {}}
    run = epsilon_spent([GaussianRounds(1.0, 0.05, 2)], 1e-5)
    for client in clients.values():
        with Pod.open(client.home, PASSPHRASE) as pod:
            assert _segments(pod) == [GaussianRounds(1.0, 0.05, 2)]  # once, sampled or not
            assert spent(pod) == pytest.approx(run)
    sampled = sum(r["sampled"] for r in record["rounds"])
    assert sampled < 8  # most pods were never picked, and paid all the same


def test_a_round_is_answered_once_and_only_as_the_aggregator_signed_it(
        tmp_path: Path, lm: tuple[Any, Any], users: list[Any], registry: Registry) -> None:
    # A process of the same user at the round socket (or anyone replaying a captured
    # message) holds a validly signed model version. It asks for a round whose noise is
    # huge and sampling tiny (charged at almost nothing), and replays a real round.
    from dataclasses import replace

    home = _pod(tmp_path, "pod", users[0].train)
    with Pod.open(home, PASSPHRASE) as pod:
        genuine = _payload(registry, CENTRAL, 1)
        take_part(pod, _asked(genuine), *lm, registry.public_key)
        with pytest.raises(RoundRefused) as info:
            take_part(pod, _asked(genuine), *lm, registry.public_key)
        assert info.value.code == "replayed"
        cheap = replace(genuine, run_id="run-cheap", dp=DPConfig(
            mode="central", noise_multiplier=1000.0, clip_norm=10.0, sample_rate=1e-6))
        with pytest.raises(RoundRefused) as info:
            take_part(pod, _asked(cheap), *lm, registry.public_key)
        assert info.value.code == "bad_signature" and "settings" in str(info.value)
        unsigned = replace(genuine, round=2, round_signature=b"")
        with pytest.raises(RoundRefused) as info:
            take_part(pod, _asked(unsigned), *lm, registry.public_key)
        assert info.value.code == "bad_signature"
        assert len(pod_ledger(pod).history()) == 1
