"""Regularization images (kohya's ``reg_data_dir`` / DreamBooth prior preservation): a second
image dataset in kohya's layout (``N_class`` folders: N repeats, the class name as caption
unless the images have sidecar captions) trained beside the training images, each of its
examples' loss weighted by ``prior_loss_weight``.

kohya's balancing (sd-scripts ``DreamBoothDataset``): the reg images, with their repeats, are
registered until their count reaches the training images' count (with repeats): when they are
fewer, the first pass registers each with its repeats and later passes add one repeat each,
in order, until the counts match; when they are more, the surplus is never trained. Both sets
then form one epoch, shuffled together (so reg and training images interleave in the batches).

The reg images are dataset files like the training ones: :func:`lora_kernel.training.data.
dataset_digests` records them keyed ``reg:<path in reg_data_dir>``, so the dataset version,
the latent cache key and the run record cover them, and :func:`reg_version` names the reg set
alone.

Runs as: the user (their kernel, ``lora train``, or a recorded run's steps as the run's user).
"""
from __future__ import annotations

from pathlib import Path

from lora_kernel.common.digests import REG_PREFIX, listing_sha256
from lora_kernel.common.errors import ConfigError


def check_reg_keys(cfg) -> None:
    """Schema checks (nothing read from disk): ``prior_loss_weight`` needs ``reg_data_dir``,
    is >= 0, and both are for image runs."""
    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(msg, file=cfg.source or "<config>", key=key)

    if cfg.prior_loss_weight is not None and not cfg.reg_data_dir:
        raise err("prior_loss_weight", "weights the loss of regularization images, and no "
                                       "reg_data_dir is set; fix: set reg_data_dir to the folder "
                                       "of class images (kohya's N_class folders) or remove "
                                       "prior_loss_weight")
    if cfg.prior_loss_weight is not None and not cfg.prior_loss_weight >= 0:
        raise err("prior_loss_weight", f"must be >= 0, got {cfg.prior_loss_weight}; fix: e.g. "
                                       f"prior_loss_weight: 1.0")
    if cfg.reg_data_dir and cfg.task != "image":
        raise err("reg_data_dir", "regularization images are for task: image; fix: remove it")


def prior_weight(cfg) -> float:
    """The loss weight of a regularization example (kohya's default 1.0)."""
    return 1.0 if cfg.prior_loss_weight is None else float(cfg.prior_loss_weight)


def check_reg_folder(cfg, file: str) -> list[dict]:
    """Disk checks of ``reg_data_dir``: a folder, not the training folder nor inside it (nor
    holding it), with at least one image; returns its entries
    (:func:`lora_kernel.training.data.kohya_entries`). Each refusal names ``reg_data_dir``."""
    from lora_kernel.training.data import kohya_entries
    reg = Path(cfg.reg_data_dir)
    if not reg.is_dir():
        raise ConfigError(f"folder not found: {reg}; fix: create it or correct the path",
                          file=file, key="reg_data_dir")
    train = Path(cfg.train_data_dir).resolve() if cfg.train_data_dir else None
    if train is not None:
        r = reg.resolve()
        if r == train or r.is_relative_to(train) or train.is_relative_to(r):
            where = ("is the training folder" if r == train else
                     "is inside the training folder" if r.is_relative_to(train) else
                     "holds the training folder")
            raise ConfigError(f"{reg} {where} {train}: its images would be trained as both "
                              f"training and regularization images; fix: move the class "
                              f"images to a folder of their own (e.g. reg/1_person/) and set "
                              f"reg_data_dir to it", file=file, key="reg_data_dir")
    entries = kohya_entries(reg, source=file, caption_extension=cfg.caption_extension)
    if not entries:
        raise ConfigError(f"{reg} has no images (PNG/JPEG/WebP) directly in it or in N_class "
                          f"folders; fix: put the class images in e.g. {reg}/1_person/",
                          file=file, key="reg_data_dir")
    from lora_kernel.training.data import open_image
    for e in entries:
        try:  # the header only, as the training images are checked
            with open_image(e["image"], cfg.max_image_pixels) as im:
                im.verify()
        except (OSError, SyntaxError, ValueError, ConfigError) as exc:
            raise ConfigError(f"{e['image']} is not a readable image ("
                              f"{getattr(exc, 'detail', exc)}); fix: re-export it as PNG/JPEG "
                              f"or remove it", file=file, key="reg_data_dir") from None
    return entries


def reg_entries(cfg) -> list[dict]:
    """The reg folder's entries (kohya layout; sorted by path), [] without ``reg_data_dir``."""
    if not cfg.reg_data_dir:
        return []
    from lora_kernel.training.data import kohya_entries
    return kohya_entries(cfg.reg_data_dir, source=cfg.source,
                         caption_extension=cfg.caption_extension)


def balanced_reg_rows(entries: list[dict], n_train: int) -> list[dict]:
    """kohya's balancing of reg entries against ``n_train`` training rows (with repeats): the
    rows (one per repeat) of the reg set, as many as the training rows when there are enough
    (see the module docstring)."""
    if not entries or n_train <= 0:
        return []
    repeats = [0] * len(entries)
    n, first = 0, True
    while n < n_train:
        for i, e in enumerate(entries):
            if first:
                repeats[i] = e["repeats"]
                n += e["repeats"]
            else:
                repeats[i] += 1
                n += 1
            if n >= n_train:
                break
        first = False
    return [e for e, k in zip(entries, repeats, strict=True) for _ in range(k)]


def reg_rows(cfg, n_train: int) -> list[dict]:
    """The reg rows one epoch trains beside ``n_train`` training rows."""
    return balanced_reg_rows(reg_entries(cfg), n_train)


def reg_version(digests: dict[str, str]) -> str | None:
    """The reg set's own version id (``ds-`` + 32 hex digits over its files alone, keyed by
    their path in reg_data_dir), from a run's dataset digests; None when it has none."""
    own = {k[len(REG_PREFIX):]: v for k, v in digests.items() if k.startswith(REG_PREFIX)}
    return "ds-" + listing_sha256(own)[:32] if own else None
