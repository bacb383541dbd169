#!/bin/sh
# Entrypoint of the hub image (docker/hub.Dockerfile): start LoRA Enclave's hub as `make hub`
# does, with PAM users by default.
#
# `make hub` runs `python -m hub.demo`, which (demo login only) writes the demo users and then
# execs `python -m jupyterhub -f hub/jupyterhub_config.py`. Here:
#   LORA_HUB_AUTH=pam|ldap (default pam)  ->  python -m jupyterhub -f hub/jupyterhub_config.py
#   LORA_HUB_AUTH=demo                    ->  python -m hub.demo   (exactly `make hub`)
# The demo step is skipped for PAM/LDAP: it would create demo-* system users.
#
# Any other command is run as given (`docker compose run hub sh`, `... hub lora audit list`).
set -eu

REPO=/opt/lora-enclave
PY="$REPO/.venv/bin/python"
: "${LORA_HUB_AUTH:=pam}"
: "${LORA_SERVICE_USER:=lora-svc}"
: "${LORA_STATE:=/var/lib/lora-enclave}"
: "${LORA_HUB_DIR:=/srv/lora-enclave/hub}"
export LORA_HUB_AUTH LORA_SERVICE_USER LORA_STATE LORA_HUB_DIR

if [ "$#" -gt 0 ] && [ "$1" != "hub" ]; then
    exec "$@"
fi

say() { echo "entrypoint-hub: $*" >&2; }

if [ "$(id -u)" != "0" ]; then
    say "the hub runs as root (PAM, servers and runs as each user's uid); got uid $(id -u)"
    exit 1
fi

# The service account owns the state directory (records, ledger, signing key). With the host's
# /etc/passwd mounted read-only it must exist on the host (docs/deploy.md); in a self-contained
# container it is created here.
if ! getent passwd "$LORA_SERVICE_USER" >/dev/null; then
    if [ -w /etc/passwd ]; then
        useradd --system --no-create-home --shell /usr/sbin/nologin "$LORA_SERVICE_USER"
        say "created the service account $LORA_SERVICE_USER"
    else
        say "service account $LORA_SERVICE_USER does not exist and /etc/passwd is read-only;" \
            "fix: on the host, useradd --system --shell /usr/sbin/nologin $LORA_SERVICE_USER"
        exit 1
    fi
fi

mkdir -p "$LORA_STATE" "$LORA_HUB_DIR"
chmod 0700 "$LORA_HUB_DIR"

case "$LORA_HUB_AUTH" in
    pam)
        if [ ! -r /etc/shadow ]; then
            say "LORA_HUB_AUTH=pam but /etc/shadow is not readable: mount the host's (read-only)" \
                "or use sssd (docs/deploy.md)"
        fi
        # Only members of the groups in policies/hub.yaml may log in: say which are missing.
        for group in $("$PY" -c 'from hub.settings import load_settings
print(" ".join(load_settings().roles))'); do
            getent group "$group" >/dev/null || say "warning: group $group does not exist"
        done
        ;;
    ldap|demo) ;;
    *)
        say "LORA_HUB_AUTH=$LORA_HUB_AUTH: use pam, ldap or demo"
        exit 2
        ;;
esac

cd "$REPO"
if [ "$LORA_HUB_AUTH" = "demo" ]; then
    exec "$PY" -m hub.demo
fi
exec "$PY" -m jupyterhub -f "$REPO/hub/jupyterhub_config.py"
