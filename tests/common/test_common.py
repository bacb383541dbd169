"""lora_kernel.common: the one time parser, the digests, the run-id rule and the two folders."""
from __future__ import annotations

import datetime as dt
import os
import stat

import pytest

from lora_kernel.common.digests import listing_sha256, path_sha256, sha256_file
from lora_kernel.common.errors import ConfigError
from lora_kernel.common.paths import (
    check_run_id,
    default_state_dir,
    lora_home,
    private_dir,
    state_dir,
)
from lora_kernel.common.timeutil import iso_time, parse_time


def test_one_time_format_round_trips():
    t = dt.datetime(2026, 11, 26, 3, 4, 5, 123000, tzinfo=dt.UTC)
    assert iso_time(t) == "2026-11-26T03:04:05.123000Z"
    assert parse_time(iso_time(t)) == t
    assert parse_time("2026-11-26") == dt.datetime(2026, 11, 26, tzinfo=dt.UTC)
    assert parse_time("2026-11-26T04:04:05+01:00") == t.replace(microsecond=0)
    assert parse_time(0) == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    for bad in ("yesterday", True, None):
        with pytest.raises((ValueError, TypeError)):
            parse_time(bad)


def test_path_digest_of_a_file_and_a_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.bin").write_bytes(b"a")
    (tmp_path / "m" / "sub").mkdir()
    (tmp_path / "m" / "sub" / "b.bin").write_bytes(b"b")
    assert path_sha256(tmp_path / "m" / "a.bin") == sha256_file(tmp_path / "m" / "a.bin")
    assert path_sha256(tmp_path / "m") == listing_sha256({
        "a.bin": sha256_file(tmp_path / "m" / "a.bin"),
        "sub/b.bin": sha256_file(tmp_path / "m" / "sub" / "b.bin")})
    before = path_sha256(tmp_path / "m")
    (tmp_path / "m" / "sub" / "b.bin").write_bytes(b"B")
    assert path_sha256(tmp_path / "m") != before
    with pytest.raises(FileNotFoundError):
        path_sha256(tmp_path / "missing")


def test_run_ids_are_folder_names_or_a_usage_error():
    assert check_run_id("20261126T030405Z-ab12cd") == "20261126T030405Z-ab12cd"
    for bad in ("../evil", "", ".hidden", "a/b", "x" * 200):
        with pytest.raises(ConfigError, match="invalid run id"):
            check_run_id(bad)


def test_state_and_home_are_separate_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("LORA_STATE", str(tmp_path / "s"))
    assert lora_home() == tmp_path / "h" and state_dir() == tmp_path / "s"
    assert state_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("LORA_STATE")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "lora-enclave"
    assert not str(default_state_dir()).startswith(str(lora_home()))
    assert os.environ["LORA_HOME"]  # the working home is untouched by the state's default


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_dir_makes_a_working_home_only_its_owner_can_use(tmp_path):
    made = private_dir(tmp_path / "a" / "lora")
    assert made.is_dir() and _mode(made) == 0o700
    opened = tmp_path / "opened"
    opened.mkdir(mode=0o755)
    os.chmod(opened, 0o755)  # as `mkdir -p` under umask 022 leaves it
    (opened / "notes.txt").write_text("mine")
    assert private_dir(opened) == opened and _mode(opened) == 0o700
    assert (opened / "notes.txt").read_text() == "mine"  # tightened, nothing else touched
    already = tmp_path / "already"
    already.mkdir(mode=0o700)
    assert private_dir(already) == already and _mode(already) == 0o700
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="a file, not a folder"):
        private_dir(tmp_path / "file")


@pytest.mark.root
def test_private_dir_refuses_another_accounts_open_folder_and_accepts_a_closed_one(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (a folder owned by another uid)")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    os.chmod(foreign, 0o755)
    with pytest.raises(ConfigError, match="other users can read it") as err:
        private_dir(foreign)
    assert str(foreign) in str(err.value) and "chmod 700" in str(err.value)
    assert _mode(foreign) == 0o755  # refused, not changed
    os.chmod(foreign, 0o700)
    assert private_dir(foreign) == foreign  # closed by its owner: accepted as it is


def test_atomic_write_replaces_whole_and_leaves_nothing_behind(tmp_path):
    from lora_kernel.common.atomic import atomic_path, atomic_write

    target = tmp_path / "f.json"
    atomic_write(target, "old")
    assert atomic_write(target, b"new") == target and target.read_bytes() == b"new"
    atomic_write(tmp_path / "secret", "s", mode=0o600)
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    # must be refused: a writer that fails leaves the old file and no temporary file
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "secret"]
