"""``python -m lora_kernel.cli``: the ``lora`` command.

Runs as: whoever runs ``lora``: the user (trusted commands act as this account in local mode, or
ask the runner service).
"""
import sys

from lora_kernel.cli.main import main

sys.exit(main())
