"""A run's progress records, read and shown on the user's side: :func:`read_progress` (the
studio: steps, losses and ETA from ``<work>/<run_id>/progress.jsonl``) and
:class:`ProgressView` (``lora run``: live bars on a terminal, periodic lines otherwise).

The records (one JSON object a line: ``cell``, ``train_start``, ``step``, ``train_end``,
``done``) are written by the training loop in the user's kernel and relayed by the run step
(:mod:`lora_kernel.steps.executor`). Runs as the user; a display only, never evidence.
"""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["ProgressView", "read_progress"]


def read_progress(path: Path) -> dict[str, Any]:
    """Steps, total, losses and ETA (s) from a run's ``progress.jsonl``."""
    out: dict[str, Any] = {"step": 0, "total": None, "losses": [], "eta": None}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "train_start":
            out["total"] = rec.get("total")
        elif rec.get("event") == "step":
            out["step"], out["total"] = rec.get("step", 0), rec.get("total") or out["total"]
            if isinstance(rec.get("loss"), (int, float)):
                out["losses"].append(float(rec["loss"]))
            start, elapsed = rec.get("start", 0) or 0, rec.get("elapsed")
            done = out["step"] - start
            if elapsed and done > 0 and out["total"]:
                out["eta"] = elapsed / done * (out["total"] - out["step"])
    return out


class ProgressView:
    """Renders a run's progress records (:mod:`lora_kernel.steps.executor`: ``cell``,
    ``train_start``, ``step``, ``train_end``, ``done``; one JSON object a line) on ``out``.

    ``live`` (a terminal): a bar of the notebook's cells and, while training, a bar of its
    steps with loss, it/s and ETA. Otherwise (a log, CI, a pipe): one line when training
    starts, one at every tenth of its steps (and at least every ``EVERY_S`` seconds), one at
    its end. Lines that are not records are shown as they are. Fed from any thread.
    """

    EVERY_S = 60.0

    def __init__(self, out: TextIO, *, live: bool) -> None:
        self.out, self.live = out, live
        self._lock = threading.Lock()
        self._partial = b""
        self._bars: dict[str, Any] = {}
        self._every, self._next, self._shown, self._last_t = 1, 0, -1, 0.0

    def feed(self, chunk: bytes) -> None:
        """Take a chunk of the executor's output (records may span chunks)."""
        with self._lock:
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for line in lines:
                self._line(line)

    def close(self) -> None:
        """Finish the bars (after the run)."""
        with self._lock:
            if self._partial.strip():
                self._line(self._partial)
            self._partial = b""
            self._close_bars()

    def _line(self, line: bytes) -> None:
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("event"), str):
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self._say(text)
            return
        handler = getattr(self, f"_on_{rec['event']}", None)
        if handler is not None:
            try:
                handler(rec)
            except (KeyError, TypeError, ValueError):
                pass  # a malformed record: progress is a display, the run goes on

    def _say(self, text: str) -> None:
        if self._bars:
            from tqdm import tqdm

            tqdm.write(text, file=self.out)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def _bar(self, name: str, **kw: Any) -> Any:
        from tqdm import tqdm

        if name not in self._bars:
            self._bars[name] = tqdm(file=self.out, dynamic_ncols=True, mininterval=0.2, **kw)
        return self._bars[name]

    def _close_bars(self) -> None:
        for bar in reversed(list(self._bars.values())):
            bar.close()
        self._bars.clear()

    def _on_cell(self, rec: dict) -> None:
        if self.live:
            bar = self._bar("cells", total=int(rec["cells"]), desc="Executing", unit="cell")
            bar.n = int(rec["done"])
            bar.refresh()

    def _on_train_start(self, rec: dict) -> None:
        step, total = int(rec["step"]), int(rec["total"])
        self._every = max(1, math.ceil(total / 10))
        self._next = (step // self._every + 1) * self._every
        self._shown, self._last_t = step, time.monotonic()
        what = f"{rec.get('task', '')} LoRA".strip()
        if rec.get("resumed_from"):
            self._say(f"training {what}: resuming at step {step}/{total} from "
                      f"{rec['resumed_from']}")
        elif not self.live:
            self._say(f"training {what}: {total} steps")
        if self.live:
            self._bar("train", total=total, initial=step, desc=what, unit="step")

    def _on_step(self, rec: dict) -> None:
        step, total = int(rec["step"]), int(rec["total"])
        if self.live:
            bar = self._bar("train", total=total, initial=step - 1, desc="training",
                            unit="step")
            extra = ({"ranks": int(rec["ranks"]),
                      "ex/s": f"{float(rec.get('examples_per_second', 0.0)):.1f}"}
                     if int(rec.get("ranks", 1) or 1) > 1 else {})
            bar.set_postfix(loss=f"{float(rec['loss']):.4f}", **extra, refresh=False)
            bar.update(step - bar.n)
            return
        now = time.monotonic()
        if step >= self._next or step >= total or now - self._last_t >= self.EVERY_S:
            self._say(self._step_line(rec))
            self._shown, self._last_t = step, now
            self._next = (step // self._every + 1) * self._every

    @staticmethod
    def _step_line(rec: dict) -> str:
        step, total = int(rec["step"]), int(rec["total"])
        done = step - int(rec.get("start", 0))
        elapsed = float(rec.get("elapsed", 0.0))
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = _hms((total - step) / rate) if rate else "?"
        ranks = ""  # data-parallel: the global step; the examples/s of all ranks together
        if int(rec.get("ranks", 1) or 1) > 1:
            ranks = (f"  {int(rec['ranks'])} ranks "
                     f"{float(rec.get('examples_per_second', 0.0)):.1f} examples/s")
        return (f"step {step}/{total} ({100 * step // max(1, total)}%)  loss "
                f"{float(rec['loss']):.4f}  {rate:.2f} it/s{ranks}  elapsed {_hms(elapsed)}  "
                f"ETA {eta}")

    def _on_train_end(self, rec: dict) -> None:
        bar = self._bars.pop("train", None)
        if bar is not None:
            bar.close()
        step, total = int(rec["step"]), int(rec["total"])
        if not self.live and step != self._shown and step < total:
            self._say(f"training stopped at step {step}/{total}")

    def _on_done(self, rec: dict) -> None:
        self._close_bars()


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
