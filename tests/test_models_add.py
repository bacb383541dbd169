"""``lora models add``: an admin puts a base model into the shared store with one command;
every user's studio lists it; a taken name and an unsafe model are refused, nothing half-
written."""
from __future__ import annotations

import stat

from lora_kernel.cli.main import main
from lora_kernel.training.models import model_sha256
from lora_kernel.user.studio import list_models


def test_an_admin_adds_a_model_that_every_studio_lists(tmp_path, demo_home, capsys,
                                                       monkeypatch):
    def lora(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out + out.err

    store = tmp_path / "shared"
    monkeypatch.setenv("LORA_SHARED_STORE", str(store))
    src = demo_home / "demo" / "models" / "tiny-sd"
    code, out = lora("models", "add", src, "--name", "house-sd")
    assert code == 0 and "added" in out, out
    dest = store / "models" / "house-sd"
    assert model_sha256(dest) == model_sha256(src)
    assert stat.S_IMODE((dest / "model_index.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755  # readable by all, writable by none
    assert dest in list_models("image", home=tmp_path / "home")

    code, out = lora("models", "add", src, "--name", "house-sd")
    assert code == 2 and "already exists" in out, out
    evil = tmp_path / "evil.ckpt"  # a pickle checkpoint: refused before anything is copied
    evil.write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    code, out = lora("models", "add", evil)
    assert code == 3, out
    code, out = lora("models", "add", "")
    assert code == 2 and "no model given" in out, out
    code, out = lora("models", "add", src, "--store", "/proc/no-such-store")
    assert code == 2 and "cannot write the shared store" in out and "Traceback" not in out, out
    assert sorted(p.name for p in (store / "models").iterdir()) == ["house-sd"]
