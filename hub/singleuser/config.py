"""Single-user server settings the spawner passes with ``--config`` (the security-relevant ones
are also on the command line, which outranks the user's own ``~/.jupyter`` files). Runs as: the
user (read by their single-user server)."""
# ruff: noqa: F821  (``c`` is provided by the Jupyter config loader)
c = get_config()  # type: ignore[name-defined]  # noqa: F821

# Air-gapped: JupyterLab must not try to fetch news or look for updates.
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"
c.ServerApp.kernel_spec_manager_class = "hub.singleuser.kernels.LoraOnlyKernelSpecManager"
c.MappingKernelManager.default_kernel_name = "lora"
