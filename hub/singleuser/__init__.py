"""What runs in the user's single-user Jupyter server (as the user, started by the spawner or
by zero-to-jupyterhub): its config file (:file:`config.py`, passed with ``--config``) and the
kernel spec manager that lets only the ``lora`` kernel start (:mod:`hub.singleuser.kernels`).
Untrusted like the user's kernel: nothing here can vouch for a record. Runs as: the user.
"""
