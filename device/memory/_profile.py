"""The user's profile: a few settings about the person, shared by all their pods.

Fields: ``name`` (what the assistant calls them), ``timezone`` (an IANA zone, used for
the time of day in the prompt) and ``language`` (a BCP 47 tag such as ``pt-PT``). They
live in the pod's metadata (``profile.<field>``), inside the encrypted store, and sync
as the ``profile`` collection.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from covey.device.store import _audit
from covey.device.store._store import set_meta
from covey.errors import InvalidInputError

if TYPE_CHECKING:
    from covey.device._pod import Pod

__all__ = ["PROFILE_FIELDS", "get_profile", "set_profile", "validate"]

PROFILE_FIELDS = ("name", "timezone", "language")
PREFIX = "profile."


def validate(field: str, value: str) -> str:
    """The value, checked (raises InvalidInputError)."""
    value = value.strip()
    if field == "name":
        if not 1 <= len(value) <= 64 or any(ord(c) < 32 for c in value):
            raise InvalidInputError("a name is 1 to 64 printable characters")
    elif field == "timezone":
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidInputError(f"unknown time zone {value!r} (e.g. Europe/Lisbon)") from None
    elif field == "language":
        if not re.fullmatch(r"[a-zA-Z]{2,3}(-[a-zA-Z0-9]{2,8})*", value):
            raise InvalidInputError(f"not a language tag: {value!r} (e.g. en, pt-PT)")
    else:
        raise InvalidInputError(f"unknown profile field {field!r}; one of "
                                f"{', '.join(PROFILE_FIELDS)}")
    return value


def get_profile(pod: Pod) -> dict[str, str]:
    """The fields that are set."""
    rows = pod.store.query("SELECT key, value FROM meta WHERE key LIKE 'profile.%'")
    return {k.removeprefix(PREFIX): v for k, v in rows if k.removeprefix(PREFIX)
            in PROFILE_FIELDS}


def set_profile(pod: Pod, values: dict[str, str | None]) -> dict[str, str]:
    """Set fields (None clears one); audited by field name only. The new profile."""
    checked = {f: None if v is None else validate(f, v) for f, v in values.items()}
    with pod.store.transaction() as c:
        for field, value in checked.items():
            if value is None:
                c.execute("DELETE FROM meta WHERE key = ?", (PREFIX + field,))
            else:
                set_meta(c, PREFIX + field, value)
        _audit.append(c, "profile", detail={"fields": sorted(checked)})
    return get_profile(pod)
