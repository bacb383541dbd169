"""``python -m lora_kernel``: the guarded kernel launcher, or ``install`` the kernelspec.

    python -m lora_kernel -f CONNECTION_FILE         start the guarded kernel
    python -m lora_kernel install [--user | --sys-prefix | --prefix P]

Runs as: the user (it starts their guarded kernel).
"""
import sys


def _main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "install":
        from lora_kernel.kernel.kernelspec import main as install_main

        return install_main(sys.argv[2:])
    from lora_kernel.kernel.launcher import main as launch

    launch(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(_main())
