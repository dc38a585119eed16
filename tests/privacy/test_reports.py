"""`covey audit`: pod and run reports render, validate, and raise the right red flags."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from covey.aggregator._run_audit import run_audit
from covey.device import Pod
from covey.device._pod_audit import pod_audit
from covey.device.federation._participation import set_budget_policy
from covey.privacy import pod_report, run_report, write_report
from covey.privacy._report import check_schema
from tests.conftest import Covey

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECRET_TEXT = "my dentist appointment is on the ninth of March at Rua Augusta"


def _screenshot(html: Path, tmp_path: Path) -> np.ndarray:
    """The page as headless Chromium renders it (RGB array)."""
    from matplotlib.image import imread

    assert CHROMIUM, "chromium is installed by `make` (DEB_PACKAGES)"
    png = tmp_path / f"{html.stem}.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--screenshot={png}", "--window-size=1100,1600",
                    html.as_uri()], check=True, capture_output=True, timeout=120)
    image: np.ndarray = imread(png)
    return image


def _assert_rendered(html: Path, tmp_path: Path) -> None:
    image = _screenshot(html, tmp_path)
    assert image.shape[0] >= 1000 and image.shape[1] >= 1000
    ink = (image[..., :3] < 0.5).any(axis=-1).mean()  # dark pixels: text and figures
    assert 0.002 < ink < 0.5, f"the page looks empty or broken (ink share {ink:.4f})"


def _pod_with_history(pod: Pod) -> None:
    from covey.device.assistant._feedback import TRAINING_CONSENT, set_consent

    with pod.store.transaction() as c:
        c.execute("INSERT INTO conversations (session_id, started_at) VALUES ('s', '2026-11-25')")
        c.execute("INSERT INTO messages (conversation_id, role, content, created_at)"
                  " VALUES (1, 'user', ?, '2026-11-25')", (SECRET_TEXT,))
    set_consent(pod, TRAINING_CONSENT, True)
    pod.audit("federated_update", peer="aggregator.example:8000", nbytes=196_608, epsilon=2.5)
    pod.audit("api.response", peer="127.0.0.1", nbytes=512)
    from covey.device.federation._budget import pod_ledger
    from covey.privacy import Release

    pod_ledger(pod).spend(Release("federated_update", "run-1", 1, "central", 1.1, 1.0, 1.0,
                                  0.1, 20, 20, 1e-5))


def test_pod_report_renders_in_chromium_and_fits_its_schema(pod: Pod, tmp_path: Path) -> None:
    _pod_with_history(pod)
    report = pod_report(pod_audit(pod))
    html, json_path = write_report(report, tmp_path / "pod.html")
    saved = json.loads(json_path.read_text())
    check_schema(saved)
    assert saved["red_flags"] == []
    assert SECRET_TEXT not in html.read_text() and SECRET_TEXT not in json_path.read_text()
    ids = [s["id"] for s in saved["sections"]]
    for needed in ("encryption", "storage", "plaintext-scan", "ledger", "egress",
                   "audit-chain", "consents"):
        assert needed in ids
    assert saved["summary"]["egress_bytes"] == {"aggregator": 196_608,
                                                "local API client": 512}
    assert 0 < saved["summary"]["epsilon_spent"] < 10
    assert "data:image/png;base64," in html.read_text()  # the ledger figure, embedded
    _assert_rendered(html, tmp_path)


def test_a_planted_plaintext_file_is_flagged(pod: Pod, tmp_path: Path) -> None:
    _pod_with_history(pod)
    leak = pod.home / "logs" / "debug.txt"
    leak.parent.mkdir(exist_ok=True)
    leak.write_bytes(b"x" * 70_000 + f"user said: {SECRET_TEXT}\n".encode())
    report = pod_report(pod_audit(pod))
    flags = [f for f in report["red_flags"] if f["code"] == "plaintext"]
    assert len(flags) == 1 and str(leak) in flags[0]["message"]
    assert "messages#1" in flags[0]["message"] and SECRET_TEXT not in flags[0]["message"]


def test_the_scan_reads_covey_own_temporary_folders_not_a_persons_folder(
        pod: Pod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from covey._tempdirs import temporary_directory

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # TMPDIR, for this process
    monkeypatch.setenv("COVEY_CACHE_DIR", str(tmp_path / "cache"))  # where the register is
    _pod_with_history(pod)
    # The person keeps their own notes in TMPDIR, in a folder whose name starts with covey.
    notes = temp / "covey-notes"
    notes.mkdir()
    (notes / "todo.txt").write_text(f"remember: {SECRET_TEXT}\n")
    report = pod_report(pod_audit(pod))
    assert [f for f in report["red_flags"] if f["code"] == "plaintext"] == []
    # A temporary folder covey made is scanned, and a leak into it is flagged.
    with temporary_directory("covey-audit-") as made:
        (made / "replica.log").write_text(f"example: {SECRET_TEXT}\n")
        flags = [f for f in pod_report(pod_audit(pod))["red_flags"] if f["code"] == "plaintext"]
    assert len(flags) == 1 and str(made / "replica.log") in flags[0]["message"]
    assert not made.exists()


def test_a_tampered_audit_row_is_flagged(pod: Pod) -> None:
    _pod_with_history(pod)
    c = pod.store.conn
    c.execute("DROP TRIGGER audit_log_no_update")
    c.execute("UPDATE audit_log SET bytes = 1 WHERE kind = 'federated_update'")
    report = pod_report(pod_audit(pod))
    assert [f["code"] for f in report["red_flags"]] == ["broken_chain"]


def test_a_ledger_over_the_users_maximum_is_flagged(pod: Pod) -> None:
    _pod_with_history(pod)
    set_budget_policy(pod, 0.5)
    report = pod_report(pod_audit(pod))
    assert [f["code"] for f in report["red_flags"]] == ["epsilon_over_target"]


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from covey.simulations._config import SimulationConfig
    from covey.simulations._simulate import simulate

    out = tmp_path_factory.mktemp("run")
    simulate(SimulationConfig(pods=6, rounds=2, clients_per_round=3, target_epsilon=4.0,
                              eval_examples=20), out)  # no --seed: private noise
    return out


def test_run_report_renders_and_rechecks_epsilon(simulated_run: Path, tmp_path: Path) -> None:
    report = run_report(run_audit(simulated_run))
    html, json_path = write_report(report, tmp_path / "run.html")
    check_schema(json.loads(json_path.read_text()))
    assert report["red_flags"] == []
    summary = report["summary"]
    record = json.loads(Path(summary["record"]).read_text())
    assert summary["epsilon"] == pytest.approx(record["epsilon"]) and summary["epsilon"] <= 4
    assert summary["epsilon_check"] == pytest.approx(record["epsilon_check"]["epsilon"])
    notes = " ".join(n for s in report["sections"] for n in s["notes"])
    assert "agree within" in notes or "explained" in notes
    _assert_rendered(html, tmp_path)


def test_epsilon_over_target_is_flagged_and_strict_fails(simulated_run: Path, tmp_path: Path,
                                                         covey: Covey) -> None:
    record_path = next((simulated_run / "runs").glob("*.json"))
    record: dict[str, Any] = json.loads(record_path.read_text())
    record["config"]["target_epsilon"] = 1.0  # the run spent about 4
    tampered = tmp_path / "over-record.json"
    tampered.write_text(json.dumps(record))
    result = covey("audit", "--run", str(tampered), "--no-empirical", "--strict",
                   "--out", str(tmp_path / "over.html"))
    assert result.returncode == 10, result.stderr
    assert "epsilon_over_target" in result.stderr
    assert json.loads(tampered.read_text()) == record  # the input is left as it was
    saved = json.loads((tmp_path / "over.html").with_suffix(".json").read_text())
    assert [f["code"] for f in saved["red_flags"]] == ["epsilon_over_target"]


def test_noise_a_reader_can_remove_is_flagged(simulated_run: Path, tmp_path: Path) -> None:
    record = json.loads(next((simulated_run / "runs").glob("*.json")).read_text())
    assert record["randomness"]["private"] is True
    seeded = {**record, "randomness": {**record["randomness"], "private": False,
                                       "reproducible": True, "seed": 3}}
    (tmp_path / "seeded.json").write_text(json.dumps(seeded))
    codes = [f["code"] for f in run_report(run_audit(tmp_path / "seeded.json"))["red_flags"]]
    assert codes == ["noise_reproducible"]
    # a record as covey wrote them before: the noise generator's state checkpointed
    old = {k: v for k, v in record.items() if k != "randomness"}
    old["checkpoint"] = {"round": 2, "rng": {"bit_generator": "PCG64", "state": {}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    codes = [f["code"] for f in run_report(run_audit(tmp_path / "old.json"))["red_flags"]]
    assert codes == ["noise_recoverable", "noise_source_unstated"]


def test_audit_cli_refuses_unclear_requests(covey: Covey, tmp_path: Path) -> None:
    both = covey("audit", "--out", str(tmp_path / "x.html"))
    assert both.returncode == 2 and "--pod, or --run" in both.stderr
    missing = covey("audit", "--run", str(tmp_path), "--no-empirical")
    assert missing.returncode == 2 and "no run record" in missing.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    corrupt = covey("audit", "--run", str(bad), "--no-empirical")
    assert corrupt.returncode == 2 and "not a readable run record" in corrupt.stderr


def test_a_record_claiming_more_noise_than_its_versions_hold_is_flagged(
        simulated_run: Path, tmp_path: Path) -> None:
    # The run's own published versions are checked against the noise its record claims:
    # a record that says z is ten times what the versions were noised with is caught.
    record = json.loads(next((simulated_run / "runs").glob("*.json")).read_text())
    record["config"]["dp"]["noise_multiplier"] *= 10
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "claimed.json").write_text(json.dumps(record))
    (tmp_path / "registry").symlink_to(simulated_run / "registry")
    report = run_report(run_audit(tmp_path))
    assert [f["code"] for f in report["red_flags"]] == ["released_noise_below_claim"]
    # and the honest record passes the same check
    honest = run_report(run_audit(simulated_run))
    rows = next(s for s in honest["sections"] if s["id"] == "released-noise")["tables"][0]["rows"]
    assert len(rows) == 2 and all(0.97 < row[-1] < 1.5 for row in rows)


@pytest.mark.slow
def test_covey_audit_flags_a_broken_run_and_not_a_correct_one(
        simulated_run: Path, tmp_path: Path, covey: Covey) -> None:
    from covey.simulations._config import SimulationConfig
    from covey.simulations._simulate import simulate
    from tests.privacy.broken_noise import ScaledNoise

    # A run whose noise source draws a tenth of what its configuration claims, and says
    # nothing about it: the broken build a user could be running.
    broken = tmp_path / "broken"
    simulate(SimulationConfig(pods=6, rounds=2, clients_per_round=3, target_epsilon=4.0,
                              eval_examples=20), broken, noise=ScaledNoise(0.1))
    result = covey("audit", "--run", str(broken), "--no-empirical", "--strict",
                   "--out", str(tmp_path / "broken.html"))
    assert result.returncode == 10, result.stderr
    assert "released_noise_below_claim" in result.stderr + result.stdout
    fine = covey("audit", "--run", str(simulated_run), "--no-empirical", "--strict",
                 "--out", str(tmp_path / "fine.html"))
    assert fine.returncode == 0, fine.stderr + fine.stdout
    assert "no red flags" in fine.stdout


@pytest.mark.slow
def test_canary_exposure_is_high_without_dp_and_falls_with_dp(simulated_run: Path) -> None:
    from covey.privacy import EmpiricalConfig
    from covey.simulations._replica import audit_run

    report = audit_run(simulated_run, empirical=True,
                       config=EmpiricalConfig(members=8, candidates=500))
    check_schema(report)
    found = report["summary"]["empirical"]
    no_dp, dp = found["no_dp"], found["dp"]
    # Out of log2(501) = 9 bits, 1 by chance: above 4, the secrets rank on average in the
    # top sixteenth of the candidates; they leaked.
    assert no_dp["mean_exposure"] > 4
    assert dp["mean_exposure"] < no_dp["mean_exposure"] - 3  # DP hides them
    assert dp["epsilon_lower_bound"] <= found["membership_provable_bound"] < dp["epsilon_theory"]
    assert no_dp["auc"] > 0.5
    assert dp["canary"]["epsilon"] < dp["canary"]["threshold"]  # a correct mechanism
    assert report["red_flags"] == []
    assert {"empirical", "canary-clients"} <= {s["id"] for s in report["sections"]}
