"""Event de-duplication: one Event per cause, not one per reconcile tick."""

from __future__ import annotations


class EventDedup:
    """What each object ("namespace/name") last announced, per topic (an Event reason, or a
    side effect such as a re-profile request). A signature names the cause: a proposal's hash,
    a set of GPUs, a reason. Shared by all reconciles; an object's entries go with it."""

    def __init__(self) -> None:
        self._last: dict[str, dict[str, str]] = {}

    def seen(self, key: str, topic: str, signature: str) -> bool:
        """Whether ``signature`` is what ``key`` last announced on ``topic``."""
        return self._last.get(key, {}).get(topic) == signature

    def remember(self, key: str, topic: str, signature: str) -> None:
        self._last.setdefault(key, {})[topic] = signature

    def should_emit(self, key: str, topic: str, signature: str) -> bool:
        """True once per new signature on ``topic`` (remembered as announced)."""
        if self.seen(key, topic, signature):
            return False
        self.remember(key, topic, signature)
        return True

    def clear(self, key: str, topic: str) -> None:
        """The cause went away: its next occurrence is announced again."""
        self._last.get(key, {}).pop(topic, None)

    def forget(self, key: str) -> None:
        """The object is gone (or no longer reconciled here)."""
        self._last.pop(key, None)
