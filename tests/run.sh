#!/usr/bin/env bash
# pytest in a private network namespace whose only interface is loopback, where this machine
# allows one (root, or unprivileged user namespaces): the Milvus server tests need it, because
# that server listens on every interface. Elsewhere pytest runs as is and those tests skip.
set -euo pipefail
for flags in -n -rn; do
  if command -v ip >/dev/null && unshare "$flags" true 2>/dev/null; then
    exec unshare "$flags" sh -c 'ip link set lo up && exec python3 -m pytest "$@"' sh "$@"
  fi
done
echo "note: cannot create a network namespace here (unshare or ip missing, or not allowed); the Milvus server tests will skip" >&2
exec python3 -m pytest "$@"
