"""What crosses from the user's work folder into a record: plain files under expected names."""
from __future__ import annotations

import io
import tarfile

from lora_kernel.trusted.evidence import extract_evidence


def _tar(members) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, data
                tar.addfile(info)
    buf.seek(0)
    return buf


def test_plain_files_under_expected_names_are_kept(tmp_path):
    notes = extract_evidence(_tar([("executed.ipynb", "file", b"{}"),
                                   ("adapter/lora.safetensors", "file", b"w"),
                                   ("tb/events.out", "file", b"t")]), tmp_path)
    assert notes == []
    assert (tmp_path / "adapter" / "lora.safetensors").read_bytes() == b"w"


def test_links_escapes_and_unexpected_names_are_refused(tmp_path):
    notes = extract_evidence(_tar([
        ("adapter/key.safetensors", "symlink", "/var/lib/lora-enclave/ledger/signing_key.pem"),
        ("adapter/hard.safetensors", "hardlink", "/etc/shadow"),
        ("../outside.txt", "file", b"x"), ("/abs.txt", "file", b"x"),
        ("manifest.json", "file", b"{}"),  # the runner writes the manifest, never the user
        ("adapter/ok.safetensors", "file", b"ok")]), tmp_path)
    assert len(notes) == 5 and all("refused" in n for n in notes)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                  if p.is_file()) == ["adapter/ok.safetensors"]
    assert not (tmp_path.parent / "outside.txt").exists()
