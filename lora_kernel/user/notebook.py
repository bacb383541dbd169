"""Helpers behind the thin training notebooks (``notebooks/train_image_lora.ipynb``,
``notebooks/train_text_lora.ipynb``). No training logic lives in a notebook: each cell calls
one function here.

A notebook's ``parameters`` cell sets ``config_path`` (empty: the demo config, built into
``lora_kernel.common.paths.lora_home()`` if missing), ``overrides`` (config keys: a mapping, or
a JSON/YAML string as ``papermill -p overrides '{"learning_rate": 0.002}'`` passes it),
``result_path`` (set by ``lora run``: where :func:`write_result` puts the
:class:`~lora_kernel.training.train.TrainResult` as JSON for the runner) and ``resume_from``
(set by ``lora run --resume RUN``: the checkpoint to continue). The first output,
:func:`run_notice`, says whether the run is recorded. Every function returns an object Jupyter
displays (PNG, HTML) so the executed notebook an auditor rereads holds the loss curve, the
samples and the summary.

Runs as: the user (their kernel, notebooks and terminal).
"""
from __future__ import annotations

import html
import io
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lora_kernel.common.atomic import atomic_write
from lora_kernel.common.errors import ConfigError
from lora_kernel.training.checks import load_config
from lora_kernel.training.config import TrainConfig, parse_value
from lora_kernel.training.demo_assets import build_demo_assets, demo_dir

__all__ = ["run_notice", "parse_overrides", "prepare_config", "run_training", "loss_curve",
           "samples_view", "summary_view", "write_result", "result_dict"]


def parse_overrides(overrides: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """The ``overrides`` parameter as a dict: a mapping as is, or a JSON/YAML mapping given as
    a string (``papermill -p overrides '{"learning_rate": 0.002}'`` passes a string); empty or
    None is no override. Anything else is a :class:`ConfigError`."""
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        import yaml

        try:
            parsed = yaml.safe_load(overrides) if overrides.strip() else {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"is not a JSON/YAML mapping ({exc}); fix: e.g. -p overrides "
                              '\'{"learning_rate": 0.002}\'', key="overrides") from None
        overrides = parsed if parsed is not None else {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"must be a mapping of config key: value, got {overrides!r}; fix: "
                          'e.g. -p overrides \'{"learning_rate": 0.002}\'', key="overrides")
    return dict(overrides)


def run_notice(config_path: str | os.PathLike = "",
               overrides: Mapping[str, Any] | str | None = None, *, task: str,
               home: str | os.PathLike | None = None) -> str:
    """The notebook's first output: whether this run is recorded.

    Under ``lora run`` (``LORA_RUN_ID`` set) one line naming the run. Otherwise (papermill or
    Jupyter directly) a warning that nothing is recorded — no run record, manifest or ledger
    entry, so the adapter cannot be reviewed or published — and the ``lora run --config ...``
    command that records the same run. Printed (the warning on stderr, so Jupyter shows it in
    red) and returned.
    """
    run_id = os.environ.get("LORA_RUN_ID")
    if run_id:
        text = (f"recorded run {run_id} (lora run): the executed notebook, adapter and inputs "
                f"are sealed in its run record")
        print(text)
        return text
    config = Path(config_path).resolve() if config_path else demo_dir(home) / f"{task}_lora.yaml"
    cmd = ["lora", "run", "--config", shlex.quote(str(config))]
    try:
        items = parse_overrides(overrides).items()
    except ConfigError:
        items = []  # prepare_config reports it next
    for key, value in items:
        if key == "output_dir":
            continue  # lora run trains in the run's own work folder
        text = value if isinstance(value, str) and parse_value(value) == value \
            else json.dumps(value)
        cmd += ["-p", shlex.quote(str(key)), shlex.quote(text)]
    text = ("NOT RECORDED: this notebook runs outside `lora run` (no LORA_RUN_ID), so no run "
            "record, manifest or ledger entry is written and its adapter cannot be reviewed or "
            "published.\nTo record this run: " + " ".join(cmd))
    print(text, file=sys.stderr, flush=True)
    return text


def prepare_config(config_path: str | os.PathLike = "",
                   overrides: Mapping[str, Any] | str | None = None,
                   *, task: str, home: str | os.PathLike | None = None) -> TrainConfig:
    """Load and validate the run's config (the one validator,
    :func:`lora_kernel.training.checks.load_config`).

    An empty ``config_path`` means the demo config of ``task`` (``<home>/demo/<task>_lora.yaml``);
    the demo assets are built first when that file is missing. ``overrides`` is a mapping or a
    JSON/YAML string (:func:`parse_overrides`). Raises :class:`ConfigError` when the config is
    invalid or trains another task than this notebook's.
    """
    overrides = parse_overrides(overrides)
    if not config_path:
        config_path = demo_dir(home) / f"{task}_lora.yaml"
        if not Path(config_path).is_file():
            build_demo_assets(home)
    cfg = load_config(config_path, overrides)
    if cfg.task != task:
        raise ConfigError(f"this notebook trains {task} LoRAs but the config has task: "
                          f"{cfg.task}; fix: use notebooks/train_{cfg.task}_lora.ipynb or "
                          f"`lora run --config` (it picks the notebook)", file=cfg.source,
                          key="task")
    return cfg


@contextmanager
def _training_notes_in_cell() -> Iterator[None]:
    """While training, show the ``lora_kernel.training`` loggers' INFO notes (latent cache hit /
    written) in the cell's output, which the executed notebook keeps; removed afterwards."""
    target = logging.getLogger("lora_kernel.training")
    handler = logging.StreamHandler(sys.stdout)  # the kernel's stdout at call time: the cell
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level = target.level
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    try:
        yield
    finally:
        target.removeHandler(handler)
        target.setLevel(old_level)


def run_training(cfg: TrainConfig, *, home: str | os.PathLike | None = None,
                 resume: str | os.PathLike = ""):
    """Train with a live progress bar (tqdm) and return the
    :class:`~lora_kernel.training.train.TrainResult`; the training notes are shown in the cell.
    ``resume`` (the notebook's ``resume_from``, set by ``lora run --resume RUN``) is the
    checkpoint folder to continue from; empty starts afresh. Errors propagate: the cell fails,
    visibly."""
    from lora_kernel.training.train import output_dir_lock, train
    with _training_notes_in_cell(), output_dir_lock(cfg.output_dir, source=cfg.source):
        if resume:
            print(f"resuming from {resume}")
        return train(cfg, progress=True, home=home, resume=str(resume) if resume else None)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight",
                metadata={"Software": None})  # no version/date: stable bytes
    return buf.getvalue()


def loss_curve(result, *, save: bool = True):
    """The training loss per step (and a moving average) as an inline PNG.

    Drawn on a plain Agg figure (no pyplot state); also written to
    ``<output_dir>/loss_curve.png`` when ``save``. Returns an ``IPython.display.Image``.
    """
    from IPython.display import Image
    from matplotlib.figure import Figure

    losses = list(result.losses)
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    k = max(1, len(losses) // 10)
    if len(losses) >= 2 * k > 1:
        avg = [sum(losses[i - k:i]) / k for i in range(k, len(losses) + 1)]
        ax.plot(range(k, len(losses) + 1), avg, lw=1.6, label=f"mean of {k}")
    for value, name, style in ((result.eval_loss_before, "eval before", ":"),
                               (result.eval_loss_after, "eval after", "--")):
        if value is not None:
            ax.axhline(value, ls=style, color="gray", lw=1, label=f"{name} {value:.4f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{result.task} LoRA: {result.steps} steps")
    ax.legend(fontsize=7)
    data = _png(fig)
    if save:
        (Path(result.output_dir) / "loss_curve.png").write_bytes(data)
    return Image(data=data, format="png")


def samples_view(result):
    """The sample grid (image: base vs LoRA per prompt) or the completions table (text)."""
    from IPython.display import HTML, Image

    if result.samples.get("grid"):
        return Image(filename=result.samples["grid"])
    rows = result.samples.get("rows")
    if rows is None and result.samples.get("completions"):
        rows = json.loads(Path(result.samples["completions"]).read_text(encoding="utf-8"))
    if not rows:
        return HTML("<p>no samples (sample_prompts is empty)</p>")
    body = "".join(f"<tr><td>{html.escape(str(r.get('prompt', '')))}</td>"
                   f"<td>{html.escape(str(r.get('base', '')))}</td>"
                   f"<td>{html.escape(str(r.get('lora', '')))}</td></tr>" for r in rows)
    return HTML("<table><thead><tr><th>prompt</th><th>base model</th><th>with LoRA</th>"
                f"</tr></thead><tbody>{body}</tbody></table>")


def _adapter_digests(result) -> dict[str, str]:
    """``{file: sha256}`` of every adapter file (a PEFT folder counts file by file)."""
    from lora_kernel.training.data import sha256_file

    out = {}
    for path in result.adapter_files.values():
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f.relative_to(Path(result.output_dir)))] = sha256_file(f)
    return out


def summary_view(result, cfg: TrainConfig | None = None):
    """A table of the run: steps, losses, eval loss before/after, adapter files with sha256,
    dataset version, base model sha256 (as HTML)."""
    from IPython.display import HTML

    def fmt(v):
        return "–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    esc = html.escape
    rows = [("task", result.task), ("steps", result.steps),
            ("seconds", f"{result.seconds:.1f}"),
            ("examples / second", f"{result.examples_per_second:.2f}"),
            ("loss (first → last tenth)", f"{result.first_loss:.4f} → {result.final_loss:.4f}"),
            ("eval loss before", fmt(result.eval_loss_before)),
            ("eval loss after", fmt(result.eval_loss_after)),
            ("dataset version", result.dataset_version),
            ("base model sha256", result.base_model_sha256)]
    measures = (getattr(result, "samples", None) or {}).get("measures")
    if measures:  # the demo's measures: image style (style_metrics) or text (text_metrics)
        from lora_kernel.training.style_metrics import summary_line
        rows.append(("what the LoRA learned, base → LoRA", summary_line(measures)))
    if cfg is not None:
        rows += [("base model", cfg.base_model), ("seed", cfg.seed),
                 ("lora rank / alpha", f"{cfg.lora_rank} / {cfg.alpha:g}"),
                 ("learning rate", f"{cfg.learning_rate:g}")]
    cells = [(esc(k), esc(str(v))) for k, v in rows]
    cells += [(f"adapter <code>{esc(name)}</code>", f"<code>sha256:{digest}</code>")
              for name, digest in _adapter_digests(result).items()]
    body = "".join(f"<tr><th style='text-align:left'>{k}</th>"
                   f"<td style='text-align:left'>{v}</td></tr>" for k, v in cells)
    return HTML(f"<table>{body}</table>")


def result_dict(result) -> dict:
    """The :class:`~lora_kernel.training.train.TrainResult` as plain JSON data (live objects
    dropped)."""
    data = result.to_dict()
    data["first_loss"], data["final_loss"] = result.first_loss, result.final_loss
    return data


def write_result(result, result_path: str | os.PathLike = "") -> str | None:
    """Write the result as JSON to ``result_path`` (given by ``lora run``); no-op when empty.
    Returns the path written, or None."""
    if not result_path:
        return None
    path = Path(result_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(result_dict(result), indent=1, default=str))
    return str(path)
