"""Hub-managed services: ``lora-runs`` (queue, runs as each user) and ``lora-audit``.

Runs as: the service's account (the service account; the runs service starts as root and drops
to it, taking root back only to start a run as its user).
"""
