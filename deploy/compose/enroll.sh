#!/bin/sh
# One-shot: enrolls each gateway once (its identity lands in its own volume). Re-running is
# harmless: an enrolled gateway is skipped.
set -eu
cli="node --import tsx bin/leafgate.ts"
fp=$($cli authority fingerprint --config /etc/leafgate/authority.json --database "$LEAFGATE_DATABASE_URL" | tail -1 | awk '{print $NF}')
for gw in gw-1 gw-2; do
  dir="/var/lib/leafgate/$gw"
  if [ -f "$dir/gateway.json" ]; then echo "$gw already enrolled"; continue; fi
  token=$($cli authority token --gateway "$gw" --config /etc/leafgate/authority.json --database "$LEAFGATE_DATABASE_URL" | tail -1 | awk '{print $NF}')
  $cli gateway enroll --authority https://authority:8443 --token="$token" --fingerprint "$fp" --id "$gw" \
    --hostname gateway --hostname localhost --data-dir "$dir"
done
