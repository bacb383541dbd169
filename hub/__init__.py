"""LoRA Enclave's JupyterHub side (trusted): configuration, the GPU spawner, the runs and audit
services. See hub/jupyterhub_config.py and docs/hub.md."""
