"""``lora resize``: a kohya-format LoRA brought to a lower rank by SVD, kohya's method
(sd-scripts ``networks/resize_lora.py``): per module the full update ``W = up @ down`` is
decomposed, the top ``rank`` singular directions kept (``up = U·diag(S)``, ``down = Vh``) and
alpha set so the scale ``alpha / rank`` stays the module's, so the resized file applies the
best rank-R approximation of the same update. Each module reports the energy it kept: the
share of the update's Frobenius norm, ``sqrt(sum S[:R]^2 / sum S^2)``.

Runs as: the user (the CLI).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_kernel.common.atomic import atomic_path
from lora_kernel.common.errors import ConfigError

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


@dataclass
class ResizeReport:
    """What a resize kept: per module its old and new rank and the Frobenius share kept."""

    rank: int
    modules: dict[str, dict] = field(default_factory=dict)
    kept_sq: float = 0.0
    total_sq: float = 0.0

    @property
    def energy_kept(self) -> float:
        """The share of the whole adapter's update norm kept (Frobenius, over all modules)."""
        return math.sqrt(self.kept_sq / self.total_sq) if self.total_sq else 1.0

    @property
    def min_module_energy(self) -> float:
        """The smallest share any one module kept."""
        return min((m["energy_kept"] for m in self.modules.values()), default=1.0)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "energy_kept": self.energy_kept,
                "min_module_energy_kept": self.min_module_energy, "modules": self.modules}


def _modules(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """The kohya modules of ``path`` (``{name: {"down", "up", "alpha"}}``) and its header."""
    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
        meta = dict(fh.metadata() or {})
        mods: dict[str, dict[str, torch.Tensor]] = {}
        for key in keys:
            for suffix, part in ((DOWN, "down"), (UP, "up"), (ALPHA, "alpha")):
                if key.endswith(suffix):
                    mods.setdefault(key[:-len(suffix)], {})[part] = fh.get_tensor(key)
    if not mods or any({"down", "up"} - set(m) for m in mods.values()):
        raise ConfigError(f"{path} is not a kohya-format LoRA (lora_unet_*.lora_down.weight / "
                          f".lora_up.weight); fix: resize the *_kohya.safetensors file, or "
                          f"`lora convert {path.name} --to kohya` first", file=path)
    return mods, meta


def resize_lora(src: str | Path, dst: str | Path, rank: int) -> ResizeReport:
    """Write ``src`` (kohya format) resized to ``rank`` into ``dst``; return the report. A
    module already at or below ``rank`` is copied as it is (kohya does the same)."""
    src, dst = Path(src), Path(dst)
    if rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {rank}", key="--rank")
    mods, meta = _modules(src)
    report = ResizeReport(rank=rank)
    out: dict[str, torch.Tensor] = {}
    for name, m in sorted(mods.items()):
        down, up = m["down"].float(), m["up"].float()
        old = down.shape[0]
        alpha = float(m["alpha"]) if "alpha" in m else float(old)
        scale = alpha / old
        weight = up.reshape(up.shape[0], old) @ down.reshape(old, -1)
        s = torch.linalg.svdvals(weight) if old <= rank else None
        if s is not None:  # nothing to cut: kept as it is
            out.update({name + DOWN: m["down"], name + UP: m["up"],
                        name + ALPHA: torch.tensor(alpha)})
            sq = float((s ** 2).sum())
            report.kept_sq += sq * scale ** 2
            report.total_sq += sq * scale ** 2
            report.modules[name] = {"old_rank": old, "new_rank": old, "energy_kept": 1.0}
            continue
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        new_up = (u[:, :rank] @ torch.diag(s[:rank])).reshape(up.shape[0], rank,
                                                              *up.shape[2:])
        new_down = vh[:rank].reshape(rank, *down.shape[1:])
        out[name + DOWN] = new_down.contiguous().to(m["down"].dtype)
        out[name + UP] = new_up.contiguous().to(m["up"].dtype)
        out[name + ALPHA] = torch.tensor(scale * rank)
        sq_all, sq_kept = float((s ** 2).sum()), float((s[:rank] ** 2).sum())
        report.kept_sq += sq_kept * scale ** 2
        report.total_sq += sq_all * scale ** 2
        report.modules[name] = {"old_rank": old, "new_rank": rank,
                                "energy_kept": math.sqrt(sq_kept / sq_all) if sq_all else 1.0}
    meta = {**meta, "ss_network_dim": str(rank),
            "lora_enclave.resized": json.dumps({"from": str(src.name), "rank": rank,
                                                "energy_kept": report.energy_kept})}
    meta.pop("ss_network_alpha", None)  # alphas now differ per module
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        save_file(out, str(tmp), metadata=meta)
    return report
