"""``python -m lora_kernel.cli``: the ``lora`` command."""
import sys

from lora_kernel.cli.main import main

sys.exit(main())
