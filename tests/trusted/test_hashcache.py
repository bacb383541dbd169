"""The base-model digest cache (issue 13): stat keys, the pin step's use of them, the store."""
from __future__ import annotations

import json
import os

from lora_kernel.common.digests import path_sha256, stat_key
from lora_kernel.steps.executor import _pin_base_model
from lora_kernel.trusted import hashcache

FAKE = "f" * 64


def _model(tmp_path):
    m = tmp_path / "model"
    (m / "unet").mkdir(parents=True)
    (m / "unet" / "w.bin").write_bytes(b"weights" * 100)
    (m / "config.json").write_text("{}")
    return m


def test_stat_key_moves_with_any_change(tmp_path):
    m = _model(tmp_path)
    k0 = stat_key(m)
    assert stat_key(m) == k0
    st = os.stat(m / "unet" / "w.bin")
    # same size, mtime put back: ctime still moves
    (m / "unet" / "w.bin").write_bytes(b"WEIGHTS" * 100)
    os.utime(m / "unet" / "w.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    k1 = stat_key(m)
    assert k1 != k0
    # replaced by another file (new inode)
    (m / "new.bin").write_bytes(b"x")
    os.replace(m / "new.bin", m / "config.json")
    assert stat_key(m) != k1
    assert stat_key(m / "config.json") != stat_key(m / "unet" / "w.bin")


def test_pin_uses_a_cached_digest_only_on_an_exact_key(tmp_path):
    m = _model(tmp_path)
    real = path_sha256(m)
    first = _pin_base_model(str(m), {})
    assert first == {"base_model_sha256": real, "base_model_stat_key": stat_key(m),
                     "base_model_hash_cached": False}
    # a hit: the cached digest is believed (here a fake one, to show it was not re-hashed)
    hit = _pin_base_model(str(m), {stat_key(m): FAKE})
    assert hit["base_model_sha256"] == FAKE and hit["base_model_hash_cached"] is True
    # any change of the files: the old entry no longer matches, hashed in full
    old = stat_key(m)
    (m / "config.json").write_text('{"a": 1}')
    miss = _pin_base_model(str(m), {old: FAKE})
    assert miss["base_model_sha256"] == path_sha256(m) != FAKE
    assert miss["base_model_hash_cached"] is False


def test_store_and_lookup_are_per_uid(tmp_path):
    state = tmp_path / "state"
    assert hashcache.lookup(1000, state) == {}
    key = "a" * 64
    hashcache.store(1000, key, "b" * 64, state)
    assert hashcache.lookup(1000, state) == {key: "b" * 64}
    assert hashcache.lookup(1001, state) == {}
    assert hashcache.cache_path(state).parent == state / "cache"
    hashcache.store(1000, "not hex", "b" * 64, state)  # refused quietly
    assert list(hashcache.lookup(1000, state)) == [key]


def test_a_broken_cache_file_is_ignored(tmp_path):
    state = tmp_path / "state"
    path = hashcache.cache_path(state)
    path.parent.mkdir(parents=True)
    path.write_text("not json")
    assert hashcache.lookup(0, state) == {}
    path.write_text(json.dumps({"entries": {"0:" + "a" * 64: {"sha256": "zz"}}}))
    assert hashcache.lookup(0, state) == {}
    hashcache.store(0, "a" * 64, "c" * 64, state)
    assert hashcache.lookup(0, state) == {"a" * 64: "c" * 64}


def test_entries_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(hashcache, "MAX_ENTRIES", 3)
    state = tmp_path / "state"
    for i in range(5):
        hashcache.store(0, f"{i:064x}", "d" * 64, state)
    assert sorted(hashcache.lookup(0, state)) == [f"{i:064x}" for i in (2, 3, 4)]


def test_training_takes_the_pinned_digest_only_on_the_same_stat_key(tmp_path, monkeypatch):
    from lora_kernel.training import models
    m = _model(tmp_path)
    monkeypatch.setattr(models, "_SHA_CACHE", {})
    monkeypatch.setenv(models.BASE_MODEL_DIGEST_ENV,
                       json.dumps({"key": stat_key(m), "sha256": FAKE}))
    assert models.model_sha256(m) == FAKE
    (m / "config.json").write_text('{"b": 2}')
    assert models.model_sha256(m) == path_sha256(m)
    monkeypatch.setenv(models.BASE_MODEL_DIGEST_ENV, "not json")
    assert models.model_sha256(m) == path_sha256(m)
