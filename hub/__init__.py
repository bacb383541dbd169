"""LoRA Enclave's JupyterHub side (trusted): configuration, the GPU spawner, the runs and audit
services. See hub/jupyterhub_config.py and docs/hub.md.

Runs as: the hub's account (root when it spawns system users' servers; the demo: the developer's
own account).
"""
