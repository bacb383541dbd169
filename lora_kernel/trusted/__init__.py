"""The trusted side: what the service account runs (runner, sealing, ledger writer and signing
key, identity, review, publication, retention, archive).

In service mode these run as the service account (or root for the runner's privilege switch),
never inside a user's kernel. Never imports torch.

Runs as: the service account (local mode: the requesting user's own account).
"""
