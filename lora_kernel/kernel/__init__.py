"""The guarded kernel (untrusted side: it runs as the user, next to user code).

Launcher, egress guard, offline environment, kernelspec, execution log and its spool. Never
imports :mod:`lora_kernel.trusted`; nothing here can vouch for a record.

Runs as: the user (their kernel; a recorded run's kernel as the run's user).
"""
