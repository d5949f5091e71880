"""Cluster key layout: companion keys hash to the slot of the key they belong to."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from voxcore.adapters.redis.keyspace import Keyspace, hash_tag, slot_source
from voxcore.core.domain.errors import InvalidKeyError


@pytest.mark.parametrize(
    ("key", "tag"),
    [("static:a", None), ("a{b}c", "b"), ("a{}b{c}", None), ("{x", None), ("}{y}", "y"), ("{a}{b}", "a")],
)
def test_hash_tag_follows_the_redis_rule(key: str, tag: str | None) -> None:
    assert hash_tag(key) == tag
    assert slot_source(key) == (key if tag is None else tag)


@pytest.mark.parametrize("prefix", ["", "app:", "{tenant}:", "t:{x}:"])
@pytest.mark.parametrize(
    "key", ["static:welcome", "tts:9f2c", "summary:session:ab12", "static:{shop}intro", "tts:ü:日本"]
)
def test_companions_share_the_slot_of_their_key(prefix: str, key: str) -> None:
    keys = Keyspace(prefix, cluster=True)
    slot = key_slot(keys.key(key).encode())
    for companion in (keys.meta(key), keys.prev(key), keys.lease(key)):
        assert key_slot(companion.encode()) == slot
        assert companion.startswith(prefix)
    assert len({keys.meta(key), keys.prev(key), keys.lease(key), keys.key(key)}) == 4


def test_distinct_keys_get_distinct_companions() -> None:
    keys = Keyspace("p:", cluster=True)
    assert keys.meta("static:a") != keys.meta("static:b")
    assert keys.meta("static:{s}a") != keys.meta("static:{s}b")


def test_brace_keys_without_a_tag_are_refused_in_a_cluster_only() -> None:
    with pytest.raises(InvalidKeyError):
        Keyspace("", cluster=True).meta("static:a}b")
    assert Keyspace("").meta("static:a}b") == "voxcore:meta:static:a}b"


@pytest.mark.parametrize("prefix", ["{open:", "close}:", "{}:"])
def test_prefixes_with_stray_braces_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="hash tag"):
        Keyspace(prefix)


def test_legacy_meta_is_the_pre_cluster_layout() -> None:
    assert Keyspace("p:").legacy_meta("static:a") == "p:voxcore:meta:static:a"
