"""Privacy: DP mechanisms and accountants, PII redaction, and audit reports from facts.

Public surface:
    DPConfig, Mode, AdaptiveClipping    the DP settings of a run, and what they guarantee
    clip_update, add_gaussian_noise     the mechanisms a round applies
    local_norm_bound                    the largest norm an honest local-mode update reaches
    MECHANISMS, mechanism, Mechanism    DP modes by name (``none``, ``central``, ``local``):
                                        each a pod's client step and the aggregator's server step
    MAX_NORM                            the norm past which any update is rejected
    gaussian_release, USAGE_SENSITIVITY the Gaussian mechanism for a statistic (usage histogram)
    NoiseSource, SecureNoise, SeededNoise  where DP noise comes from (CSPRNG by default)
    SeedRatchet, poisson_sample         forward-secure round seeds and the sample they draw
    GaussianRounds                      one segment of a privacy history (z, q, rounds)
    ACCOUNTANTS, get_accountant         accountants by name: ``rdp``, ``prv``
    epsilon_spent, noise_for_epsilon    epsilon of a history; the noise for a target
    Ledger, LedgerStorage, Release      the user's budget: compose, check, write, verify
    LedgerEntry, BudgetPolicy           a signed ledger row; the user's maximum and delta
    BudgetExceeded, RunChanged, LedgerTampered   why a release was refused
    redact                              replace personal data patterns in a string
    UserText                            marks a value as user text so logging never renders it
    RedactingFilter                     a logging filter that applies both (on every covey log)
    PodAudit, AuditEvent, pod_report    a pod's facts (gathered by the pod) and their report
    RunAudit, run_report                a run's facts (its record and releases) and their report
    EmpiricalConfig, ReplicaScores, ArmScores, SecretLosses, CanaryScores, add_empirical
                                        the empirical tests: a replica's scores, judged
    cosines, unit_directions            canary directions and their cosines with a release
    write_report                        an audit report as self-contained HTML and JSON
"""

from covey.privacy._accounting import (
    ACCOUNTANTS,
    GaussianRounds,
    epsilon_spent,
    get_accountant,
    noise_for_epsilon,
)
from covey.privacy._canaries import cosines, unit_directions
from covey.privacy._dp import (
    AdaptiveClipping,
    DPConfig,
    Mode,
    add_gaussian_noise,
    clip_update,
    local_norm_bound,
)
from covey.privacy._empirical import (
    ArmScores,
    CanaryScores,
    EmpiricalConfig,
    ReplicaScores,
    SecretLosses,
    add_empirical,
)
from covey.privacy._ledger import (
    BudgetExceeded,
    BudgetPolicy,
    Ledger,
    LedgerEntry,
    LedgerStorage,
    LedgerTampered,
    Release,
    RunChanged,
    verify_signature,
)
from covey.privacy._mechanisms import (
    MAX_NORM,
    MECHANISMS,
    USAGE_SENSITIVITY,
    Mechanism,
    gaussian_release,
    mechanism,
)
from covey.privacy._noise import (
    NoiseSource,
    SecureNoise,
    SeededNoise,
    SeedRatchet,
    poisson_sample,
)
from covey.privacy._pod_report import AuditEvent, PodAudit, pod_report
from covey.privacy._redact import RedactingFilter, UserText, redact
from covey.privacy._report import write_report
from covey.privacy._run_report import RunAudit, run_report

__all__ = [
    "ACCOUNTANTS",
    "MAX_NORM",
    "MECHANISMS",
    "USAGE_SENSITIVITY",
    "AdaptiveClipping",
    "ArmScores",
    "AuditEvent",
    "BudgetExceeded",
    "BudgetPolicy",
    "CanaryScores",
    "DPConfig",
    "EmpiricalConfig",
    "GaussianRounds",
    "Ledger",
    "LedgerEntry",
    "LedgerStorage",
    "LedgerTampered",
    "Mechanism",
    "Mode",
    "NoiseSource",
    "PodAudit",
    "RedactingFilter",
    "Release",
    "ReplicaScores",
    "RunAudit",
    "RunChanged",
    "SecretLosses",
    "SecureNoise",
    "SeedRatchet",
    "SeededNoise",
    "UserText",
    "add_empirical",
    "add_gaussian_noise",
    "clip_update",
    "cosines",
    "epsilon_spent",
    "gaussian_release",
    "get_accountant",
    "local_norm_bound",
    "mechanism",
    "noise_for_epsilon",
    "pod_report",
    "poisson_sample",
    "redact",
    "run_report",
    "unit_directions",
    "verify_signature",
    "write_report",
]
