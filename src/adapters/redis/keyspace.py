"""Key layout that stays valid in Redis Cluster: keys used together share one hash slot.

Redis Cluster hashes only the *hash tag* of a key - the part between the first ``{`` and the first
``}`` after it, when that part is non-empty - or the whole key when it has no tag. A MULTI/EXEC or a
Lua script may only touch keys of one slot, so every companion key voxcore writes beside a public
key (its format hash, its previous version) is built to hash exactly like that key:

* a key with a tag (``static:{shop}welcome``) keeps it: ``voxcore:meta:static:{shop}welcome``;
* a key without one is wrapped whole: ``voxcore:meta:{static:welcome}`` (``{static:welcome}`` hashes
  ``static:welcome``, which is what the key itself hashes);
* with a key prefix that carries a tag (``{tenant}:``), every key of that prefix shares its slot.

The public keys themselves (``static:*``, ``tts:*``, ``summary:session:*``, ``ratelimit:*``) are
unchanged. In standalone and Sentinel mode the same layout is used (one layout for every
deployment: data moves between them as it is); fragments written before this layout had their
format hash at ``voxcore:meta:<key>``, which :class:`Keyspace` still reads (``legacy_meta``).
"""

from __future__ import annotations

from typing import Final

from voxcore.core.domain.errors import InvalidKeyError

META_NAMESPACE: Final = "voxcore:meta:"
PREV_NAMESPACE: Final = "voxcore:prev:"
LEASE_NAMESPACE: Final = "voxcore:lease:"


def hash_tag(key: str) -> str | None:
    """The hash tag Redis Cluster hashes for ``key``, or ``None`` when it hashes the whole key."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:  # no closing brace, or an empty tag "{}"
        return None
    return key[start + 1 : end]


def slot_source(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes (its tag, or the whole key)."""
    tag = hash_tag(key)
    return key if tag is None else tag


class Keyspace:
    """Builds the physical keys of one key prefix.

    Args:
        prefix: Prepended to every key (a tenant's namespace on a shared Redis). Braces in it must
            form a complete, non-empty hash tag (``{tenant}:``): anything else would make the slot
            of every key depend on the key and split a fragment's keys across slots.
        cluster: True for Redis Cluster: a key whose braces form no tag (``a}b``) is refused
            there (see :meth:`companion`); on one server it is stored with a plain companion key.

    Raises:
        ValueError: the prefix has braces that form no hash tag.
    """

    __slots__ = ("_cluster", "_prefix", "_prefix_tagged")

    def __init__(self, prefix: str = "", *, cluster: bool = False) -> None:
        if not isinstance(prefix, str):
            raise ValueError(f"key prefix must be a string, got {type(prefix).__name__}")
        self._prefix_tagged = hash_tag(prefix) is not None
        if ("{" in prefix or "}" in prefix) and not self._prefix_tagged:
            raise ValueError(
                f"key prefix {prefix!r} has braces that do not form a hash tag like '{{tenant}}:': "
                "the keys of one fragment would land in different cluster slots"
            )
        self._prefix = prefix
        self._cluster = cluster

    @property
    def prefix(self) -> str:
        """The prefix of every key."""
        return self._prefix

    def key(self, key: str) -> str:
        """The physical key of a public key."""
        return self._prefix + key

    def companion(self, namespace: str, key: str) -> str:
        """A key beside ``key`` (``namespace`` + ...) that hashes to the same cluster slot.

        Raises:
            InvalidKeyError: in cluster mode, ``key`` has braces but no hash tag (``a}b``,
                ``x{}y``): no companion key can share its slot, so it cannot be written atomically.
        """
        if self._prefix_tagged or hash_tag(key) is not None:
            return self._prefix + namespace + key  # the tag (the prefix's, or the key's) is kept
        if "}" in key or "{" in key:
            if not self._cluster:  # one server: any two keys go together
                return self._prefix + namespace + key
            raise InvalidKeyError(
                f"key {key!r} has braces but no hash tag: Redis Cluster cannot keep it beside its "
                "companion keys; use a key without '{'/'}' or with a complete tag like '{shop}'"
            )
        return f"{self._prefix}{namespace}{{{self._prefix}{key}}}"

    def meta(self, key: str) -> str:
        """The Hash with the fragment's audio format (same slot as the fragment)."""
        return self.companion(META_NAMESPACE, key)

    def prev(self, key: str) -> str:
        """The previous version of an overwritten fragment (same slot as the fragment)."""
        return self.companion(PREV_NAMESPACE, key)

    def lease(self, key: str) -> str:
        """The short synthesis lease of a ``tts:*`` key (same slot as the key)."""
        return self.companion(LEASE_NAMESPACE, key)

    def legacy_meta(self, key: str) -> str:
        """Where the format hash was kept before the cluster-safe layout (read-only fallback)."""
        return self._prefix + META_NAMESPACE + key
