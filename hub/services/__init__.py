"""Hub-managed services: ``lora-runs`` (queue, runs as each user) and ``lora-audit``."""
