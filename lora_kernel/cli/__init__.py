"""The ``lora`` command line: thin parsers over library calls (:mod:`lora_kernel.cli.main`).

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
