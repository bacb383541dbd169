"""Typed errors. Library code raises these; only the CLI turns them into exit codes.

Exit codes (documented in README "Exit codes"):

====  ======================  ===============================================
code  exception               meaning
====  ======================  ===============================================
0     -                       success
1     (any other exception)   crash: a bug, report it
2     ConfigError             the config / parameters are invalid
3     UnsafeModelError        a model file or config was refused (pickle, remote code)
3     NoMatch                 a search found nothing (``lora audit lineage``: no run used it)
4     EgressBlocked           outbound network traffic was refused
5     VerificationError       an audit record, ledger or file failed verification
6     PolicyRefusal           a policy forbids the action (review, publish, prune)
7     RunFailed               a training run / notebook failed (record written)
8     DataError               a dataset is missing, empty or malformed
130   TrainingInterrupted     Ctrl-C; a checkpoint was saved
====  ======================  ===============================================

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import os
from typing import Any


class LoraError(Exception):
    """Base class of every error LoRA Enclave raises on purpose."""

    exit_code = 1


class ConfigError(LoraError, ValueError):
    """A configuration value is invalid. The message names file, key, problem and fix."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | os.PathLike[str] | None = None,
                 key: str | None = None):
        self.file = str(file) if file is not None else None
        self.key = key
        self.detail = message  # the message without the file/key prefix
        where = []
        if self.file:
            where.append(self.file)
        if key:
            where.append(f"key '{key}'")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class UnsafeModelError(LoraError):
    """A model was refused because loading it could run code or reach the network."""

    exit_code = 3


class NoMatch(LoraError):
    """A search matched nothing (``lora audit lineage``: no run used the query). Not a fault:
    the exit code lets a script tell "nothing used it" from "it was used" (0)."""

    exit_code = 3


class EgressBlocked(LoraError, PermissionError):
    """Outbound network traffic was refused by the egress policy."""

    exit_code = 4


class VerificationError(LoraError):
    """An audit record, ledger entry or file did not verify."""

    exit_code = 5


class PolicyRefusal(LoraError, PermissionError):
    """A policy forbids this action (self-approval, unapproved publish, young prune...)."""

    exit_code = 6


class RunFailed(LoraError):
    """A training run failed; its record (marked failed) was written before this was raised.

    ``record`` is the :class:`lora_kernel.trusted.runseal.RunRecord` of the failed run (set by
    the runner).
    """

    exit_code = 7
    record: Any = None  # a RunRecord; common/ may not import lora_kernel.trusted


class DataError(LoraError):
    """A dataset is missing, empty or malformed."""

    exit_code = 8


class TrainingInterrupted(LoraError, KeyboardInterrupt):
    """Training was interrupted (Ctrl-C / SIGTERM) after saving a checkpoint."""

    exit_code = 130


# The errors an answer across a process boundary may name (the pin step's, the runner
# service's), by class name and by exit code (exit code 3 is UnsafeModelError's: NoMatch is
# never an answer). TrainingInterrupted is no answer: it ends the process that raised it.
_ANSWERED: tuple[type[LoraError], ...] = (ConfigError, UnsafeModelError, NoMatch,
                                          EgressBlocked, VerificationError, PolicyRefusal,
                                          RunFailed, DataError)
_BY_NAME = {cls.__name__: cls for cls in _ANSWERED}
_BY_CODE = {cls.exit_code: cls for cls in reversed(_ANSWERED)}


def error_from_answer(error: Any, *, prefix: str = "", limit: int | None = None) -> LoraError:
    """The typed error an answer's ``{"error": {"type", "exit_code", "message"}}`` object
    stands for: the class it names when it is one of ours with that exit code, else the class
    of its exit code, else :class:`LoraError`. ``prefix`` goes before the message (which is cut
    to its first ``limit`` characters). The one mapping for every answer that crosses a
    process boundary (the pin step, a Job's pin answer, the runner service)."""
    fields = error if isinstance(error, dict) else {}
    code = fields.get("exit_code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else 1
    named = _BY_NAME.get(str(fields.get("type")))
    cls = named if named is not None and named.exit_code == code else \
        _BY_CODE.get(code, LoraError)
    message = str(fields.get("message"))
    return cls(prefix + (message[:limit] if limit is not None else message))
