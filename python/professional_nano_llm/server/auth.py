"""API keys: `Authorization: Bearer <key>`, compared in constant time against every configured key."""

from __future__ import annotations

import hmac


class ApiKeys:
    def __init__(self, keys: list[str] | None):
        self._keys = [k.encode() for k in keys or [] if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> bool:
        """True when no key is configured, or the header carries one of the keys."""
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare against every key (no early exit), so timing says nothing about which key matched.
        matches = [hmac.compare_digest(given, key) for key in self._keys]
        return any(matches)
