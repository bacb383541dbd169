"""``lora demo-assets``: build the tiny demo models, datasets and configs (no download);
``lora models add``: an admin puts a base model into the platform's shared store.

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
from __future__ import annotations


def cmd_demo_assets(args) -> int:
    """Build the demo assets into ``<home>/demo`` and print where everything went."""
    from lora_kernel.training.demo_assets import build_demo_assets
    paths = build_demo_assets(args.home, seed=args.seed)
    for key, path in paths.items():
        print(f"{key:20s} {path}")
    return 0


def cmd_models_add(args) -> int:
    """Copy a checked base model into the shared store's ``models/``, read-only to users."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from lora_kernel.common.errors import ConfigError
    from lora_kernel.training.model_safety import check_model_path
    from lora_kernel.training.models import model_sha256

    store_root = args.store or os.environ.get("LORA_SHARED_STORE")
    if not store_root:
        raise ConfigError("no shared store: give --store DIR or set LORA_SHARED_STORE (make "
                          "hub uses hub_shared/ in the checkout)", key="--store")
    if not str(args.model).strip():
        raise ConfigError("no model given; fix: lora models add PATH (a model folder or one "
                          ".safetensors file)", key="PATH")
    src = check_model_path(args.model)  # pickles and remote code refused, nothing loaded
    name = args.name or src.name
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"not a plain model name: {name!r}", key="--name")
    store = Path(store_root) / "models"
    dest = store / name
    if dest.exists():
        raise ConfigError(f"{dest} already exists; fix: --name ANOTHER, or remove it first "
                          "(records pin models by sha256, so a replaced model is noticed)",
                          key="--name")
    try:
        store.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=store))
    except OSError as exc:
        raise ConfigError(f"cannot write the shared store {store}: {exc.strerror or exc}; fix: "
                          "run as the admin who owns it, or give --store DIR",
                          key="--store") from None
    try:
        staged = tmp / name
        if src.is_dir():
            shutil.copytree(src, staged, symlinks=False)
        else:
            shutil.copyfile(src, staged)
        for folder, _dirs, files in os.walk(staged) if staged.is_dir() else []:
            os.chmod(folder, 0o755)
            for f in files:
                os.chmod(os.path.join(folder, f), 0o644)
        if staged.is_file():
            os.chmod(staged, 0o644)
        digest = model_sha256(staged)
        os.rename(staged, dest)
    except OSError as exc:  # a full or read-only store: nothing half-written stays
        raise ConfigError(f"cannot copy {src} into {store}: {exc.strerror or exc}; fix: free "
                          "space there or give --store DIR", key="--store") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"added {dest} (sha256 {digest}); the studio lists it for every user")
    return 0


def register(sub) -> None:
    """Add ``demo-assets`` and ``models add`` to the ``lora`` CLI."""
    p = sub.add_parser("models", help="the platform's shared model store (admins)")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True
    a = msub.add_parser("add", help="check a local base model and copy it into the shared "
                                    "store, readable by every user")
    a.add_argument("model", metavar="PATH", help="a diffusers/transformers folder or one "
                                                 ".safetensors file")
    a.add_argument("--name", help="its name in the store (default: the folder/file name)")
    a.add_argument("--store", help="the shared store (default: $LORA_SHARED_STORE)")
    a.set_defaults(func=cmd_models_add)
    p = sub.add_parser(
        "demo-assets", help="build the tiny demo models, datasets and configs",
        description="Generate, deterministically and offline, a tiny Stable Diffusion model "
                    "(folder and single .safetensors), a tiny Llama, an image and a text "
                    "dataset and two ready-to-run configs into <home>/demo.")
    p.add_argument("--home", default=None,
                   help="working home (default: $LORA_HOME, else ./lora_home)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weight init (default 0)")
    p.set_defaults(func=cmd_demo_assets)
