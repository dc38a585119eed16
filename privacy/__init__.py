"""Privacy: PII redaction now; DP mechanisms, accountants and audit reports follow.

Public surface:
    redact           replace personal data patterns in a string
    UserText         marks a value as user text so logging never renders it
    RedactingFilter  a logging filter that applies both, installed by default
"""

from covey.privacy._redact import RedactingFilter, UserText, redact

__all__ = ["RedactingFilter", "UserText", "redact"]
