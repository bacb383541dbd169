"""The researcher studio: ipywidgets over the config validator and the runner
(``notebooks/studio.ipynb`` calls :func:`studio`; no logic lives in the notebook).

Pick a dataset (only folders you can read), a base model from the model store
(``policies/models.yaml`` ``store:``), a template from ``templates/``; edit the parameters, each
checked by the same validator as ``lora config`` (an error appears under its field, in the
CLI's fix-it wording); **Start** submits the run — to the hub's runs service when the server
runs under the hub (``$LORA_RUNS_URL`` and the server's token), else ``lora run`` locally — and
the studio follows it: a progress bar with ETA, the loss curve, the sample grid when done, and
"my runs". What was submitted is shown as YAML in the studio's own output; JupyterLab saves
widget state into the notebook (``hub/lab-overrides.json``, installed by ``make setup``), so the
saved notebook shows an auditor exactly what was chosen (the config file itself is pinned in
the run record).

This runs in the user's kernel (untrusted): it only builds a config file in the user's working
home and asks the runner; the runner pins, runs and seals.

Runs as: the user (their kernel, notebooks and terminal).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from lora_kernel.common.errors import ConfigError, LoraError
from lora_kernel.common.paths import lora_home
from lora_kernel.common.policy import load_policy
from lora_kernel.common.yamlio import load_yaml
from lora_kernel.user.progress import read_progress
from lora_kernel.user.runs_client import RunsClient, is_final

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
# The parameters the studio shows, by task (every other key comes from the template).
EDITABLE = {
    "image": ["output_name", "lora_rank", "lora_alpha", "learning_rate", "max_train_steps",
              "batch_size", "resolution", "train_text_encoder", "random_flip", "center_crop",
              "seed", "save_steps", "sample_prompts"],
    "text": ["output_name", "lora_rank", "lora_alpha", "learning_rate", "max_train_steps",
             "batch_size", "max_seq_length", "packing", "seed", "save_steps", "sample_prompts",
             "dataset_format", "quantization", "objective"],
}
PATH_KEYS = ("base_model", "train_data_dir", "metadata_path", "output_dir")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
_ANNOUNCED = re.compile(r"\brun (\d{8}T\d{6}Z-[0-9a-f]+)\b")


# -- what there is to choose ------------------------------------------------------------------
SHARED_STORE_ENV = "LORA_SHARED_STORE"
_MODEL_DEFAULTS = {"store": ["{shared}/models", "{home}/models", "{home}/demo/models"],
                   "datasets": ["{shared}/datasets", "{home}/datasets", "{home}/demo/datasets"]}


def _policy_folders(key: str, home: str | os.PathLike[str] | None) -> list[Path]:
    """The folders ``policies/models.yaml`` lists under ``key``, placeholders filled:
    ``{home}`` (the working home) and ``{shared}`` (``$LORA_SHARED_STORE``, the platform's
    shared store; entries naming it are skipped when it is not set)."""
    values = {"{home}": str(lora_home(home)),
              "{shared}": os.environ.get(SHARED_STORE_ENV, "")}
    out = []
    for entry in load_policy("models", _MODEL_DEFAULTS).get(key) or []:
        text = str(entry)
        if any(k in text and not v for k, v in values.items()):
            continue
        for k, v in values.items():
            text = text.replace(k, v)
        out.append(Path(text).expanduser())
    return out


def model_store(home: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders holding base models: ``policies/models.yaml`` ``store:`` (the platform's shared
    store, then ``<home>/models`` and ``<home>/demo/models`` by default)."""
    return _policy_folders("store", home)


def list_models(task: str, home: str | os.PathLike[str] | None = None) -> list[Path]:
    """Base models of ``task`` in the store: diffusers folders or single ``.safetensors`` files
    (image), transformers folders (text)."""
    found = []
    for store in model_store(home):
        if not store.is_dir():
            continue
        for p in sorted(store.iterdir()):
            if task == "image" and (p / "model_index.json").is_file():
                found.append(p)
            elif task == "image" and p.suffix == ".safetensors" and p.is_file():
                found.append(p)
            elif task == "text" and (p / "config.json").is_file() \
                    and not (p / "model_index.json").exists() and _is_causal_lm(p):
                found.append(p)
    return found


def _preferred(options: list[Path], wanted: Any, key: str) -> Path:
    """The option the template names (its path, or a folder of the same name, e.g. the
    shared store's ``tiny-sd`` for a template's ``demo/models/tiny-sd``), else the first."""
    if isinstance(wanted, str) and wanted:
        path = Path(wanted)
        if key == "metadata_path":  # a dataset file: its folder is what the list holds
            path = path.parent
        for match in (lambda p: p == path, lambda p: p.name == path.name):
            hit = next((p for p in options if match(p)), None)
            if hit is not None:
                return hit
    return options[0]


def _is_causal_lm(folder: Path) -> bool:
    """Whether a transformers folder holds a causal LM (not, say, the demo CLIP that
    ``lora label`` uses): its config names a ``...ForCausalLM`` architecture."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") if isinstance(config, dict) else None
    return any(str(a).endswith("ForCausalLM") for a in archs or [])


def model_label(path: Path, task: str) -> str:
    """How the model picker shows a base model: its path and, for an image model, its family
    (``sd15``, ``sd2``, ``sdxl``, ``flux``, ``sd3``; read from ``model_index.json`` or the
    file's keys, nothing loaded), or why it cannot be trained; and its licence when
    ``policies/models.yaml`` names one (:mod:`lora_kernel.common.licences`)."""
    from lora_kernel.common.licences import model_licence
    try:
        licence = model_licence(path)
    except ConfigError:
        licence = "licence policy malformed"
    tail = f", licence: {licence}" if licence else ""
    if task != "image":
        return f"{path} (licence: {licence})" if licence else str(path)
    from lora_kernel.training.families.detect import detect_family
    try:
        family = detect_family(path) or "not a diffusers model"
    except (ConfigError, OSError):
        family = "family not trained here"
    return f"{path} ({family}{tail})"


def list_datasets(task: str, home: str | os.PathLike[str] | None = None) -> list[Path]:
    """Dataset folders you can read, in the folders ``policies/models.yaml`` ``datasets:``
    lists (the shared store's, by group, then ``<home>/datasets`` and ``<home>/demo/datasets``):
    images (image) or ``.jsonl`` files (text)."""
    found = []
    for root in _policy_folders("datasets", home):
        if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
            continue
        for d in sorted(root.iterdir()):
            if not d.is_dir() or not os.access(d, os.R_OK | os.X_OK):
                continue
            names = [p.suffix.lower() for p in d.iterdir()]
            if (task == "image" and IMAGE_SUFFIXES & set(names)) or \
                    (task == "text" and ".jsonl" in names):
                found.append(d)
    return found


def list_templates() -> list[Path]:
    return sorted(TEMPLATES.glob("*.yaml"))


def template_task(path: Path) -> str:
    raw = load_yaml(path, what="template") or {}
    return str(raw.get("task", "image")) if isinstance(raw, dict) else "image"


# -- where runs go ------------------------------------------------------------------------------
class HubRuns:
    """The hub's runs service, with the single-user server's token (the studio's view of
    :class:`~lora_kernel.user.runs_client.RunsClient`)."""

    def __init__(self, url: str, token: str) -> None:
        self.client = RunsClient(url, token, timeout=30)

    def submit(self, config_path: Path, gpus: int | None = None) -> str:
        """Queue the config; ``gpus``: the GPUs the run asks for (its ``num_processes: auto``
        trains on that many ranks; None: the service's default)."""
        request: dict[str, Any] = {"config": str(config_path)}
        if gpus is not None:
            request["gpus"] = gpus
        return str(self.client.submit(request)["id"])

    def status(self, handle: str) -> dict[str, Any]:
        row = self.client.get(handle)
        return {"status": row["status"], "run_id": row.get("run_id"), "error": row.get("error"),
                "done": is_final(row["status"])}

    def samples(self, handle: str) -> bytes | None:
        return self.client.samples(handle)

    def measures(self, handle: str) -> dict | None:
        """None: the runs service does not serve a run's measures yet (its record's
        ``samples/samples.json`` holds them)."""
        return None

    def my_runs(self) -> list[dict[str, Any]]:
        return [{"id": r["id"], "run_id": r.get("run_id"), "status": r["status"],
                 "what": Path(str(r.get("path", ""))).name} for r in self.client.list()]


class LocalRuns:
    """``lora run --config`` in a child process (local mode, or the runner service when its
    socket exists)."""

    def __init__(self) -> None:
        self.procs: dict[str, dict[str, Any]] = {}

    def submit(self, config_path: Path, gpus: int | None = None) -> str:
        """Run the config; ``gpus`` > 1: on that many processes (``-p num_processes N``; the
        GPUs are this server's)."""
        lora = Path(sys.executable).with_name("lora")
        more = ["-p", "num_processes", str(gpus)] if gpus is not None and gpus > 1 else []
        proc = subprocess.Popen([str(lora), "run", "--config", str(config_path), "--quiet",
                                 *more],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        handle = str(proc.pid)
        info: dict[str, Any] = {"proc": proc, "run_id": None, "record": None, "lines": [],
                                "what": config_path.name}
        self.procs[handle] = info

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                info["lines"].append(line.rstrip())
                m = _ANNOUNCED.search(line)
                if m and not info["run_id"]:
                    info["run_id"] = m.group(1)
                if line.startswith("record: "):
                    info["record"] = line[len("record: "):].strip()
        threading.Thread(target=read, daemon=True).start()
        return handle

    def status(self, handle: str) -> dict[str, Any]:
        info = self.procs[handle]
        rc = info["proc"].poll()
        status = "running" if rc is None else ("succeeded" if rc == 0 else "failed")
        error = None if rc in (None, 0) else "\n".join(info["lines"][-5:])
        return {"status": status, "run_id": info["run_id"], "error": error,
                "done": rc is not None, "record": info["record"]}

    def samples(self, handle: str) -> bytes | None:
        record = self.procs[handle].get("record")
        grid = Path(record) / "samples" / "grid.png" if record else None
        return grid.read_bytes() if grid and grid.is_file() else None

    def measures(self, handle: str) -> dict | None:
        """The run's demo measures (image style and adherence, or text exact match) from its
        record's ``samples/samples.json``; None when it has none."""
        import json

        record = self.procs[handle].get("record")
        path = Path(record) / "samples" / "samples.json" if record else None
        if not (path and path.is_file()):
            return None
        measures = json.loads(path.read_text(encoding="utf-8")).get("measures")
        return measures if isinstance(measures, dict) else None

    def my_runs(self) -> list[dict[str, Any]]:
        return [{"id": h, "run_id": i["run_id"], "status": self.status(h)["status"],
                 "what": i["what"]} for h, i in self.procs.items()]


def default_runs() -> HubRuns | LocalRuns:
    url, token = os.environ.get("LORA_RUNS_URL"), os.environ.get("JUPYTERHUB_API_TOKEN")
    return HubRuns(url, token) if url and token else LocalRuns()


def loss_png(losses: list[float]) -> bytes:
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 2.4))
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


# -- the widgets -------------------------------------------------------------------------------
class Studio:
    """The studio's widgets and their handlers (``Studio().widget`` is what the notebook
    shows)."""

    def __init__(self, home: str | os.PathLike[str] | None = None,
                 runs: HubRuns | LocalRuns | None = None,
                 template: str | os.PathLike[str] | None = None,
                 announce: Callable[[str], None] | None = None) -> None:
        import ipywidgets as w

        self.home = lora_home(home)
        self.runs = runs or default_runs()
        # What was submitted, as YAML, in an output of the widget itself: JupyterLab saves
        # widget state into the notebook (hub/lab-overrides.json), so it stays in the record.
        self.submitted = w.Output()
        self.announce = announce or self.submitted.append_stdout
        self.handle: str | None = None
        self.run_id: str | None = None
        self.done = False
        self._watcher: threading.Thread | None = None
        templates = list_templates()
        chosen = Path(template) if template else templates[0]
        self.template = w.Dropdown(options=[(p.name, str(p)) for p in templates],
                                   value=str(chosen), description="template")
        self.dataset = w.Dropdown(description="dataset")
        self.model = w.Dropdown(description="base model")
        self.fields: dict[str, Any] = {}
        self.errors: dict[str, Any] = {}
        self.general_error = w.HTML()
        self.form = w.VBox()
        self.start_button = w.Button(description="Start", button_style="primary", icon="play")
        # GPUs for the run: asked of the runs service (hub), or ranks on this server (local);
        # the config's num_processes: auto trains on as many ranks as the run was given
        self.gpus = w.BoundedIntText(value=1, min=1, max=64, description="GPUs")
        self.status = w.HTML("")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="steps")
        self.eta = w.Label("")
        self.plot = w.Output()
        self.samples = w.Output()
        self.my_runs_html = w.HTML()
        self.refresh_button = w.Button(description="Refresh my runs", icon="refresh")
        self.template.observe(lambda _c: self._load_template(), names="value")
        self.start_button.on_click(lambda _b: self.start())
        self.refresh_button.on_click(lambda _b: self.refresh_runs())
        self._load_template()
        self.widget = w.VBox([
            w.HTML("<h3>LoRA studio</h3>"), self.template, self.dataset, self.model, self.form,
            self.general_error, w.HBox([self.gpus, self.start_button, self.status]),
            w.HBox([self.progress, self.eta]), self.submitted, self.plot, self.samples,
            w.HBox([w.HTML("<b>My runs</b>"), self.refresh_button]), self.my_runs_html])

    # -- form --------------------------------------------------------------------------------
    def _load_template(self) -> None:
        import ipywidgets as w

        from lora_kernel.training.config import TrainConfig

        path = Path(self.template.value)
        self.base = dict(load_yaml(path, what="template") or {})
        for key in PATH_KEYS:  # a template's relative paths are relative to the template
            if isinstance(self.base.get(key), str) and not Path(self.base[key]).is_absolute():
                self.base[key] = str((path.parent / self.base[key]).resolve())
        self.task = str(self.base.get("task", "image"))
        data_key = "train_data_dir" if self.base.get("train_data_dir") else "metadata_path"
        for widget, options, label, key in (
                (self.dataset, list_datasets(self.task, self.home), str, data_key),
                (self.model, list_models(self.task, self.home),
                 lambda p: model_label(p, self.task), "base_model")):
            widget.options = [(label(p), str(p)) for p in options]
            widget.value = str(_preferred(options, self.base.get(key), key)) \
                if options else None
        types = {f.name: f for f in fields(TrainConfig)}
        rows, self.fields, self.errors = [], {}, {}
        for key in EDITABLE[self.task]:
            f = types[key]
            value = self.base.get(key, None if f.default is f.default_factory else f.default)
            if value is None and key != "lora_alpha" and callable(f.default_factory):
                value = f.default_factory()
            kind = str(f.type)
            desc = key.replace("_", " ")
            if "bool" in kind:
                widget = w.Checkbox(value=bool(value), description=desc, indent=False)
            elif "list" in kind:
                widget = w.Textarea(value="\n".join(str(v) for v in value or []),
                                    description=desc, placeholder="one per line")
            else:  # numbers and text: typed as text, parsed like `-p KEY VALUE`
                widget = w.Text(value="" if value is None else str(value), description=desc)
            widget.tooltip = (f.metadata or {}).get("help", "")
            widget.observe(lambda _c: self.validate(), names="value")
            self.fields[key] = widget
            self.errors[key] = w.HTML()
            rows.append(w.VBox([widget, self.errors[key]]))
        self.form.children = rows
        self.validate()

    def values(self) -> dict[str, Any]:
        """The config the form stands for: the template, the choices and the fields."""
        from lora_kernel.training.config import parse_value

        raw = dict(self.base)
        raw.pop("metadata_path", None)  # the template's dataset file does not follow a choice
        if self.dataset.value:
            chosen = Path(self.dataset.value)
            if self.task == "text":  # the first .jsonl of the folder
                jsonl = sorted(chosen.glob("*.jsonl"))
                same = chosen / Path(str(self.base.get("metadata_path", ""))).name
                raw["metadata_path"] = str(same if same in jsonl else
                                           (jsonl[0] if jsonl else chosen))
            else:
                raw["train_data_dir"] = str(chosen)
        if self.model.value:
            raw["base_model"] = self.model.value
        for key, widget in self.fields.items():
            value = widget.value
            if isinstance(value, bool):
                raw[key] = value
            elif "\n" in str(value) or key == "sample_prompts":
                raw[key] = [line for line in str(value).splitlines() if line.strip()]
            elif str(value).strip() == "":
                raw.pop(key, None)
            else:
                raw[key] = parse_value(str(value))
        # outputs go to the user's own working home (a recorded run moves them into its
        # work folder anyway), never next to the template
        raw["output_dir"] = str(self.home / "output" / str(raw.get("output_name") or "lora"))
        return raw

    def validate(self):  # type: ignore[no-untyped-def]
        """Check the form with the config validator; errors under their fields. Returns the
        TrainConfig, or None."""
        from html import escape

        from lora_kernel.training.checks import validate_config

        for label in self.errors.values():
            label.value = ""
        self.general_error.value = ""
        try:
            cfg = validate_config(self.values(), source="studio", base_dir=self.home)
        except ConfigError as exc:
            target = self.errors.get((exc.key or "").split(".")[0])
            message = f"<span style='color:#b00020'>{escape(exc.detail)}</span>"
            if target is not None:
                target.value = message
            else:
                self.general_error.value = (f"<span style='color:#b00020'>"
                                            f"{escape(str(exc))}</span>")
            self.start_button.disabled = True
            return None
        self.start_button.disabled = False
        return cfg

    # -- runs --------------------------------------------------------------------------------
    def start(self) -> str | None:
        """Write the config into the working home, announce it and submit it."""
        import yaml

        if self.validate() is None:
            return None
        raw = self.values()
        folder = self.home / "studio"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{raw.get('output_name', 'lora')}.yaml"
        text = yaml.safe_dump(raw, sort_keys=True)
        path.write_text(text, encoding="utf-8")
        self.announce(f"studio: submitting {path}\n{text}\n")
        try:  # one GPU: the request as ever; more: the run's data-parallel ranks
            gpus = int(self.gpus.value)
            self.handle = (self.runs.submit(path) if gpus == 1
                           else self.runs.submit(path, gpus=gpus))  # type: ignore[call-arg]
        except LoraError as exc:
            self.status.value = f"<span style='color:#b00020'>{exc}</span>"
            return None
        self.done, self.run_id = False, None
        self.status.value = f"submitted ({self.handle})"
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        return self.handle

    def poll(self) -> bool:
        """Update status, progress, ETA and the loss curve once; True when the run ended."""
        from IPython.display import Image

        if self.handle is None:
            return True
        st = self.runs.status(self.handle)
        self.run_id = st.get("run_id") or self.run_id
        if self.run_id:
            prog = read_progress(self.home / "work" / self.run_id / "progress.jsonl")
            if prog["total"]:
                self.progress.max = int(prog["total"])
                self.progress.value = int(prog["step"])
            if prog["eta"] is not None:
                self.eta.value = f"ETA {prog['eta']:.0f} s"
            if prog["losses"] and len(prog["losses"]) != getattr(self, "_plotted", 0):
                self._plotted = len(prog["losses"])
                self.plot.outputs = ()  # (append_display_data: safe from the watcher thread)
                self.plot.append_display_data(Image(data=loss_png(prog["losses"])))
        self.status.value = f"{st['status']}" + (f" — run {self.run_id}" if self.run_id else "")
        if st["done"]:
            self.done = True
            if st["status"] == "succeeded":
                self.progress.value = self.progress.max
                self.eta.value = "done"
                grid = self.runs.samples(self.handle)
                self.samples.outputs = ()
                if grid:
                    self.samples.append_display_data(Image(data=grid))
                measures = self.runs.measures(self.handle)
                if measures:  # what the LoRA learned, base vs LoRA (style_metrics)
                    from html import escape

                    from IPython.display import HTML

                    from lora_kernel.training.style_metrics import summary_line
                    self.samples.append_display_data(
                        HTML(f"<p>{escape(summary_line(measures))}</p>"))
            elif st.get("error"):
                self.status.value += f"<pre>{st['error']}</pre>"
            self.refresh_runs()
        return bool(st["done"])

    def _watch(self, every: float = 1.0) -> None:
        while not self.poll():
            time.sleep(every)

    def wait(self, timeout: float = 600) -> bool:
        """Block until the run ends (tests, batch use); True if it did."""
        if self._watcher is not None:
            self._watcher.join(timeout)
        return self.done

    def refresh_runs(self) -> None:
        from html import escape

        try:
            runs = self.runs.my_runs()
        except LoraError as exc:
            self.my_runs_html.value = escape(str(exc))
            return
        rows = "".join(f"<tr><td>{escape(str(r['id']))}</td><td>{escape(str(r['what']))}</td>"
                       f"<td>{escape(str(r['status']))}</td>"
                       f"<td>{escape(str(r.get('run_id') or ''))}</td></tr>" for r in runs)
        self.my_runs_html.value = ("<table><tr><th>#</th><th>config</th><th>status</th>"
                                   f"<th>record</th></tr>{rows}</table>")


def studio(**kwargs: Any) -> Any:
    """Build the studio and return its widget (the notebook's only call)."""
    s = Studio(**kwargs)
    s.refresh_runs()
    return s.widget
