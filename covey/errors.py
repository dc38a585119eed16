"""The exception root of covey and its specific subclasses.

Every error a user can cause or meet is a :class:`CoveyError`. Each subclass builds its
own one-line message, never containing user text, so the CLI can print it as it is and
exit with the subclass's ``exit_code``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "AuditChainError",
    "ConfigError",
    "CoveyError",
    "DiskFullError",
    "InvalidInputError",
    "PassphraseRequiredError",
    "PodExistsError",
    "PodForgottenError",
    "PodLockedError",
    "PodNotFoundError",
    "StoreCorruptError",
    "WrongPassphraseError",
]


class CoveyError(Exception):
    """Root of every error covey raises on purpose; its message is one safe line."""

    exit_code = 1


class ConfigError(CoveyError):
    """A configuration value is missing or invalid."""

    exit_code = 2


class InvalidInputError(CoveyError, ValueError):
    """A value the user gave is not acceptable; the message says which and why."""

    exit_code = 2


class PodNotFoundError(CoveyError):
    """No pod exists at the given home."""

    exit_code = 3

    def __init__(self, home: Path) -> None:
        super().__init__(f"no pod at {home} (create one with `covey pod init --home {home}`)")
        self.home = home


class PodExistsError(CoveyError):
    """`pod init` was asked to create a pod where one already exists."""

    exit_code = 3

    def __init__(self, home: Path) -> None:
        super().__init__(f"a pod already exists at {home}; nothing was changed")
        self.home = home


class PodForgottenError(CoveyError):
    """The pod was crypto-shredded; its data can never be read again."""

    exit_code = 3

    def __init__(self, home: Path, when: str) -> None:
        super().__init__(
            f"the pod at {home} was erased on {when}: its data key was destroyed, "
            "so nothing in it can be recovered"
        )
        self.home = home


class PassphraseRequiredError(CoveyError):
    """No passphrase was given and there is no terminal to ask for one."""

    exit_code = 4

    def __init__(self) -> None:
        super().__init__("a passphrase is needed: set COVEY_PASSPHRASE or run in a terminal")


class WrongPassphraseError(CoveyError):
    """The passphrase does not unwrap the pod's data key."""

    exit_code = 4

    def __init__(self) -> None:
        super().__init__("wrong passphrase: the pod's data key could not be unwrapped")


class PodLockedError(CoveyError):
    """Another process holds the pod's write lock past the busy timeout."""

    exit_code = 5

    def __init__(self, home: Path, waited_s: float) -> None:
        super().__init__(f"the pod at {home} stayed busy for {waited_s:g} s; try again")


class StoreCorruptError(CoveyError):
    """The pod's database or key file cannot be read as written."""

    exit_code = 6

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} is corrupt or truncated ({reason}); it was left untouched")
        self.path = path


class DiskFullError(CoveyError):
    """A write failed because the disk (or the file size limit) is full."""

    exit_code = 7

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"the disk holding {path} is full: the last write was rolled back, "
            "earlier ones are safe"
        )
        self.path = path


class SyncError(CoveyError):
    """Pairing or syncing with the user's other devices failed; the message says why."""

    exit_code = 3


class AuditChainError(CoveyError):
    """The audit log's hash chain does not verify."""

    exit_code = 8

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"audit log broken at entry {seq}: {reason}")
        self.seq = seq


class RedFlagError(CoveyError):
    """An audit report raised red flags and ``--strict`` was asked for."""

    exit_code = 10

    def __init__(self, flags: list[dict[str, str]]) -> None:
        first = flags[0]
        more = f" (and {len(flags) - 1} more)" if len(flags) > 1 else ""
        super().__init__(f"{len(flags)} red flag(s): {first['code']}: {first['message']}{more}")
        self.flags = flags
