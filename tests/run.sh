#!/usr/bin/env bash
# pytest in a private network namespace whose only interface is loopback, where this machine
# allows one (root, or unprivileged user namespaces): the Milvus server tests need it, because
# that server listens on every interface. Elsewhere pytest runs as is and those tests skip.
set -euo pipefail
# The web page's tests drive headless Chromium from the system packages; install it where we may.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver (apt-get) for the web page's tests" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1 \
      || echo "note: apt-get could not install chromium; the web page's tests will skip" >&2
  else
    echo "note: chromium and chromium-driver are not installed (apt-get install chromium chromium-driver); the web page's tests will skip" >&2
  fi
fi
for flags in -n -rn; do
  if command -v ip >/dev/null && unshare "$flags" true 2>/dev/null; then
    exec unshare "$flags" sh -c 'ip link set lo up && exec python3 -m pytest "$@"' sh "$@"
  fi
done
echo "note: cannot create a network namespace here (unshare or ip missing, or not allowed); the Milvus server tests will skip" >&2
exec python3 -m pytest "$@"
