#!/usr/bin/env bash
# OS packages the project needs (Debian). Idempotent; skips what is already there.
# Run by `make setup`: as root it installs what is missing; otherwise it prints the one
# command to run and lets set-up go on (the tests that need a missing package then skip,
# except under LORA_TEST_STRICT=1, as in .ci/run, where they fail).
#   python3.11-venv    the shared environment (make setup)
#   util-linux         unshare (network-namespace tests)
#   nodejs, npm        configurable-http-proxy (the hub's proxy, pinned in hub/package-lock.json)
#   chromium           browser tests (Playwright drives Debian's Chromium; no browser download)
#   nftables           nft: the egress firewall per uid (lora firewall, tests/trusted/test_firewall.py)
#   iproute2           ip netns / veth (firewall tests)
#   curl, iputils-ping child-process and ICMP cases of the firewall tests
#   passwd             useradd/usermod/groupadd: system users when the hub or tests run as root
#   fonts-droid-fallback  a CJK-capable font for captions drawn in contact sheets and sample grids
set -euo pipefail
need=()
/usr/bin/python3.11 -c "import venv, ensurepip" 2>/dev/null || need+=(python3.11-venv)
command -v unshare >/dev/null || need+=(util-linux)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)
command -v ping >/dev/null || need+=(iputils-ping)
command -v useradd >/dev/null || need+=(passwd)
[ -f /usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf ] || need+=(fonts-droid-fallback)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "missing OS packages: ${need[*]}" >&2
    echo "  fix: sudo bash .ci/os-packages.sh   (tests that need them are skipped until then)" >&2
    case " ${need[*]} " in *" python3.11-venv "*|*" nodejs "*|*" npm "*) exit 1;; esac
  fi
fi
