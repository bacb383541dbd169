"""The contract between a run's trusted side and its user-side steps: the kernel's name, the
names of the files a run's work folder hands over, the environment variables both sides set or
read, and the module names the trusted side starts. Neutral constants, imported by whichever
account runs either side (the service account's runner and runs service; the user's steps,
kernel and training loop). Runs as: whichever account imports it.
"""
from __future__ import annotations

__all__ = ["ACK", "BASE_MODEL_DIGEST_FILE_ENV", "COLLECTED", "DIGEST_FILE", "EXECUTOR_MODULE",
           "JOBSTEP_MODULE", "KERNEL_NAME", "OUTPUT_EXTRAS", "PROGRESS_ENV", "RUN_ID_ENV"]

# The guarded kernel every recorded run executes in (its kernelspec name).
KERNEL_NAME = "lora"
# The training config's keys whose values are filesystem paths, resolved against the config
# file's folder (lora_kernel.training.config); the runner re-points them when it lays a run's
# pinned inputs out from the snapshot store (lora_kernel.trusted.objects).
CONFIG_PATH_KEYS = ("train_data_dir", "metadata_path", "base_model", "output_dir", "init",
                    "init_adapter", "eval_path", "reg_data_dir", "validation_dir")
# The modules of the user-side steps (``python -m ...``).
EXECUTOR_MODULE = "lora_kernel.steps.executor"
JOBSTEP_MODULE = "lora_kernel.steps.jobstep"
# What a run's output folder contributes to the record (checkpoints stay out: they are
# resumable state, not evidence); adapter files go under adapter/.
OUTPUT_EXTRAS = ("tb", "samples", "loss_curve.png", "training_summary.json", "snapshots")
# Names the collector writes at the top of its tar, and the trusted extractor accepts.
COLLECTED = ("executed.ipynb", "run_result.json", "error.json", "events.jsonl", "adapter",
             *OUTPUT_EXTRAS)
# The run id a run's processes carry (it tags the kernel's events; the runner kills by it).
RUN_ID_ENV = "LORA_RUN_ID"
# The file the training loop appends progress records to (the run step relays them).
PROGRESS_ENV = "LORA_PROGRESS_FILE"
# Where a pre-started run's kernel finds the pinned base model's stat key and digest: a file
# in the work folder (named DIGEST_FILE), named by this variable.
BASE_MODEL_DIGEST_FILE_ENV = "LORA_BASE_MODEL_DIGEST_FILE"
DIGEST_FILE = ".base_model_digest.json"
# The line a Job's step prints once its pin answer is written; the runs service believes only
# the first such line of the pod's log.
ACK = "lora-jobstep pinned sha256="
