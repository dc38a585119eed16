"""Empirical privacy tests: canary exposure and user-level membership inference.

Both rerun the run's mechanism (mode, noise multiplier z, clip norm C) on a small
simulated replica, once without DP and once with it, every pod in every round (q = 1,
so the replica's own theoretical epsilon is computed without sampling amplification):

- *Canary exposure* (Carlini et al., "The Secret Sharer", 2019). A few replica users get
  a random secret ("my secret number is 3 9 1 4 2 7") repeated among their messages.
  After training, the secret's loss is ranked among ``candidates`` random secrets of the
  same form; exposure = log2((candidates + 1) / rank), at most log2(candidates + 1).
  Random guessing scores about 1 bit.
- *Membership inference*, user level (a loss-based attack, Yeom et al. 2018, calibrated
  by the base model). For members (replica users) and non-members (other federated
  users), the score is the drop in a user's mean loss from the base model to the
  trained one. The attack's ROC AUC, and the empirical lower bound on epsilon of
  Jagielski et al. (2020): the largest ln((TPR_low - delta) / FPR_high) over thresholds,
  with one-sided 95 % Clopper-Pearson bounds. A lower bound above the theoretical
  epsilon would mean the guarantee is false; it is a red flag.

The canary and membership settings are worst-case-leaning on purpose (repeated secrets,
every pod every round, several local epochs), as an auditor's should be.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from covey._tempdirs import temporary_directory
from covey.privacy._accounting import GaussianRounds, epsilon_spent, noise_for_epsilon
from covey.privacy._dp import DPConfig
from covey.privacy._report import Figure, flag, section, table

__all__ = ["EmpiricalConfig", "add_empirical", "exposure", "membership_bound"]

CANARY_PROMPT = "what is your secret number?"

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EmpiricalConfig:
    """Size of the replica and of the tests."""

    pods: int = 8  # members of the replica (as many non-members are scored)
    canaries: int = 2  # members who hold one secret each
    repeats: int = 64  # times a secret appears among its holder's messages
    rounds: int = 8
    local_epochs: int = 3
    lr: float = 0.02
    candidates: int = 1000  # random secrets each canary is ranked against
    digits: int = 6
    max_messages: int = 200  # replica users have 10..max_messages training messages
    fallback_epsilon: float = 8.0  # the DP arm's target when the run was not private
    seed: int = 0
    workers: int = 0


def exposure(canary_loss: float, candidate_losses: np.ndarray) -> float:
    """Exposure in bits of a canary ranked among candidates (ties count against it)."""
    rank = 1 + int((candidate_losses <= canary_loss).sum())
    return math.log2((len(candidate_losses) + 1) / rank)


def _clopper_pearson(k: int, n: int, upper: bool, level: float = 0.95) -> float:
    from scipy.stats import beta

    if upper:
        return 1.0 if k >= n else float(beta.ppf(level, k + 1, n - k))
    return 0.0 if k <= 0 else float(beta.ppf(1 - level, k, n - k + 1))


def membership_bound(member: np.ndarray, other: np.ndarray, delta: float
                     ) -> tuple[float, float, list[float], list[float]]:
    """(AUC, epsilon lower bound, FPRs, TPRs) of "member when score >= threshold"."""
    scores = np.concatenate([member, other])
    m, n = len(member), len(other)
    auc = float(np.mean([(a > b) + 0.5 * (a == b) for a in member for b in other]))
    best, fprs, tprs = 0.0, [0.0], [0.0]
    for t in sorted(set(scores.tolist()), reverse=True):
        tp, fp = int((member >= t).sum()), int((other >= t).sum())
        fprs.append(fp / n)
        tprs.append(tp / m)
        tpr_low, fpr_high = _clopper_pearson(tp, m, False), _clopper_pearson(fp, n, True)
        fnr_high, tnr_low = _clopper_pearson(m - tp, m, True), _clopper_pearson(n - fp, n, False)
        for num, den in ((tpr_low - delta, fpr_high), (tnr_low - delta, fnr_high)):
            if num > 0 and den > 0:
                best = max(best, math.log(num / den))
    return auc, best, fprs, tprs


def _losses(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], batch: int = 256
            ) -> np.ndarray:
    """Summed negative log-likelihood of each reply (its tokens and ``<|eos|>``)."""
    import torch

    from covey.models._tokenizer import PAD

    rows = [tok.example(c, r) for c, r in pairs]
    out = np.zeros(len(rows))
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            width = min(max(len(ids) for ids, _ in chunk) - 1, model.cfg.context)
            ids = torch.full((len(chunk), width), PAD, dtype=torch.long)
            targets = torch.full((len(chunk), width), -100, dtype=torch.long)
            for k, (seq, start) in enumerate(chunk):
                cut = max(0, len(seq) - (model.cfg.context + 1))  # keep the last tokens
                seq, start = seq[cut:], max(1, start - cut)
                ids[k, :len(seq) - 1] = torch.tensor(seq[:-1])
                targets[k, start - 1:len(seq) - 1] = torch.tensor(seq[start:])
            logp = torch.log_softmax(model(ids)[0].float(), dim=-1)
            mask = targets >= 0
            picked = logp.gather(2, targets.clamp(min=0)[..., None])[..., 0] * mask
            out[i:i + len(chunk)] = (-picked.sum(dim=1)).numpy()
    return out


def _secret(rng: np.random.Generator, digits: int) -> str:
    return "my secret number is " + " ".join(str(int(d)) for d in rng.integers(0, 10, digits))


def _replica(cfg: EmpiricalConfig) -> tuple[list[Any], list[Any], list[str]]:
    """Members (the first ``canaries`` holding secrets), non-members, and the secrets."""
    from covey.models import Example, FederatedUser
    from covey.simulations._simulate import SimulationConfig, population

    pool = [u for u in population(SimulationConfig(min_messages=10))
            if len(u.train) <= cfg.max_messages]
    if len(pool) < 2 * cfg.pods:
        raise ValueError(f"only {len(pool)} users fit the replica; asked for {2 * cfg.pods}")
    rng = np.random.default_rng(cfg.seed)
    chosen = [pool[i] for i in rng.choice(len(pool), 2 * cfg.pods, replace=False)]
    members, others = chosen[:cfg.pods], chosen[cfg.pods:]
    secrets = [_secret(rng, cfg.digits) for _ in range(cfg.canaries)]
    for i, secret in enumerate(secrets):
        user = members[i]
        planted = tuple(Example(CANARY_PROMPT, secret, "") for _ in range(cfg.repeats))
        members[i] = FederatedUser(user.user_id, user.train + planted, user.test)
    return members, others, secrets


def _train_arm(cfg: EmpiricalConfig, members: list[Any], dp: DPConfig, out: Path,
               progress: Progress, label: str) -> bytes:
    from covey.aggregator._registry import Registry
    from covey.simulations._simulate import SimulationConfig, simulate

    sim = SimulationConfig(pods=len(members), rounds=cfg.rounds,
                           clients_per_round=len(members), target_epsilon=math.inf,
                           mode=dp.mode if dp.private else "central",
                           clip_norm=dp.clip_norm if dp.private else 1.0, delta=dp.delta,
                           local_epochs=cfg.local_epochs, lr=cfg.lr, max_examples=10_000,
                           eval_examples=20, seed=cfg.seed, workers=cfg.workers,
                           noise_multiplier=dp.noise_multiplier if dp.private else 0.0)
    done = [0]

    def on_round(_: dict[str, Any]) -> None:
        done[0] += 1
        progress(label, done[0], cfg.rounds)

    progress(label, 0, cfg.rounds)
    record = simulate(sim, out, on_round=on_round, users=members)
    registry = Registry(out / "registry")
    # The mechanism's output is the last released aggregate, rolled back or not.
    last = max((v for v in registry.versions() if v.run_id == record["run_id"]),
               key=lambda v: v.round)
    return registry.get(last.id)[1]


def _own_messages(user: Any, per_user: int = 32) -> list[tuple[str, str]]:
    """The (context, reply) pairs membership is scored on: the user's, not a canary."""
    return [(e.context, e.reply) for e in user.train if e.context != CANARY_PROMPT][:per_user]


def _user_scores(model: Any, tok: Any, users: Sequence[Any], base: dict[str, float]
                 ) -> np.ndarray:
    return np.asarray([base[u.user_id] - float(np.mean(_losses(model, tok, _own_messages(u))))
                       for u in users])


def add_empirical(report: dict[str, Any], dp: DPConfig, cfg: EmpiricalConfig,
                  progress: Progress | None = None) -> None:
    """Run both tests on a replica of ``dp`` and add their section to ``report``."""
    from covey.models import Adapter, TinyLM, load_model

    report_progress = progress or (lambda stage, done, total: None)
    members, others, secrets = _replica(cfg)
    delta = dp.delta
    if dp.private:
        arm_dp = replace(dp, sample_rate=1.0, adaptive=None)
        arm_label = f"DP, the run's mechanism (z = {dp.noise_multiplier:.3g}, C = {dp.clip_norm:g})"
    else:
        z = noise_for_epsilon(cfg.fallback_epsilon, delta, 1.0, cfg.rounds, "rdp")
        arm_dp = DPConfig(mode="central", noise_multiplier=z, clip_norm=1.0, sample_rate=1.0,
                          delta=delta)
        arm_label = f"DP at epsilon {cfg.fallback_epsilon:g} (z = {z:.3g}, C = 1)"
    arms = [("no DP", DPConfig(mode="central", noise_multiplier=0.0, clip_norm=math.inf,
                               sample_rate=1.0, delta=delta)), (arm_label, arm_dp)]
    model, tok, _ = load_model()
    zero = Adapter.zeros_like(TinyLM(model.cfg))
    zero.load_into(model)
    rng = np.random.default_rng(cfg.seed + 1)
    candidates = [[_secret(rng, cfg.digits) for _ in range(cfg.candidates)] for _ in secrets]
    candidates = [[c for c in cands if c != s] for cands, s in zip(candidates, secrets,
                                                                    strict=True)]
    base_user = {u.user_id: float(np.mean(_losses(model, tok, _own_messages(u))))
                 for u in members + others}

    def exposures() -> list[float]:
        values = []
        for secret, cands in zip(secrets, candidates, strict=True):
            losses = _losses(model, tok, [(CANARY_PROMPT, c) for c in cands])
            own = float(_losses(model, tok, [(CANARY_PROMPT, secret)])[0])
            values.append(exposure(own, losses))
        return values

    base_exposure = exposures()
    rows: list[list[Any]] = []
    canary_rows: list[list[Any]] = []
    roc = Figure("Membership inference ROC (user level)",
                                            "false positive rate", "true positive rate")
    summary: dict[str, Any] = {}
    with temporary_directory("covey-audit-") as tmp:
        for i, (label, arm) in enumerate(arms):
            adapter = _train_arm(cfg, members, arm, Path(tmp) / f"arm{i}", report_progress,
                                 f"training replica: {label}")
            Adapter.from_bytes(adapter).load_into(model)
            report_progress("canary exposure and membership inference", i, len(arms))
            exp = exposures()
            auc, bound, fprs, tprs = membership_bound(
                _user_scores(model, tok, members, base_user),
                _user_scores(model, tok, others, base_user), delta)
            theory = (epsilon_spent([GaussianRounds(arm.noise_multiplier, 1.0, cfg.rounds)],
                                    delta) if arm.private else math.inf)
            rows.append([label, arm.noise_multiplier, theory if arm.private else "inf",
                         float(np.mean(exp)), float(np.max(exp)), auc, bound])
            canary_rows.extend([label, k + 1, base_exposure[k], e] for k, e in enumerate(exp))
            roc.line(label, fprs, tprs)
            summary["no_dp" if not arm.private else "dp"] = {
                "mean_exposure": float(np.mean(exp)), "auc": auc, "epsilon_lower_bound": bound,
                "epsilon_theory": theory if arm.private else None}
            if arm.private and bound > theory:
                flag(report, "empirical_epsilon_above_theory",
                     f"membership inference proves epsilon >= {bound:.3g}, above the "
                     f"theoretical {theory:.3g}")
    report_progress("canary exposure and membership inference", len(arms), len(arms))
    roc.line("chance", [0.0, 1.0], [0.0, 1.0])
    sec = section(report, "empirical", "Empirical tests: canaries and membership inference")
    sec["notes"].append(
        f"A replica of the run's mechanism: {cfg.pods} federated users as pods, every pod in "
        f"each of {cfg.rounds} rounds, {cfg.local_epochs} local epochs at learning rate "
        f"{cfg.lr:g}, delta {delta:.3g}. {cfg.canaries} of them hold a random "
        f"{cfg.digits}-digit secret repeated {cfg.repeats} times; each secret is ranked "
        f"among {cfg.candidates} random ones (maximum measurable exposure "
        f"{math.log2(cfg.candidates + 1):.1f} bits; chance about 1 bit; the base model "
        f"before training: {np.mean(base_exposure):.2f} bits). Membership inference "
        f"scores {cfg.pods} members against {cfg.pods} users who never took part.")
    sec["notes"].append("The replica has no sampling amplification (q = 1), so its "
                        "theoretical epsilon is higher than the run's for the same noise.")
    table(sec, ["arm", "z", "theoretical epsilon (replica)", "mean canary exposure (bits)",
                "max canary exposure", "membership AUC", "empirical epsilon lower bound "
                "(95 %)"], rows)
    table(sec, ["arm", "canary", "exposure before training", "exposure after"],
          canary_rows, "each canary")
    sec["figures"].append(roc.to_dict())
    report["summary"]["empirical"] = summary
