"""The ``lora`` command line: thin parsers over library calls (:mod:`lora_kernel.cli.main`)."""
