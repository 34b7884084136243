#!/usr/bin/env bash
# End-to-end check of the Containerfile on a machine that reaches no image registry:
#  1. build a Debian base image with debootstrap and `docker import` (cached as
#     deploy-agent-base:bookworm; KEEP_BASE=0 removes it afterwards),
#  2. build the agent's wheels and the agent image on that base,
#  3. run the agent container as the spec shows (Docker socket and state dir mounted),
#  4. deploy the busybox test service through it, check it answers, stop it.
# Needs root, a running dockerd, debootstrap and busybox-static. Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=deploy-agent-base:bookworm
IMAGE=deploy-agent:container-test
AGENT=deploy-agent-container-test
INSTANCE=container-test
PORT=${PORT:-19090}
URL=http://127.0.0.1:$PORT
work=$(mktemp -d)

cleanup() {
  docker rm -f "$AGENT" >/dev/null 2>&1 || true
  # Only containers this agent instance created, whatever state the run ended in.
  leftover=$(docker ps -aq --filter "label=tidybot.deploy-agent=$INSTANCE")
  [ -z "$leftover" ] || docker rm -f $leftover >/dev/null
  docker rmi -f "$IMAGE" >/dev/null 2>&1 || true
  [ "${KEEP_BASE:-1}" = 1 ] || docker rmi -f "$BASE" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'echo "container-image-test: FAILED at line $LINENO" >&2' ERR
step() { echo "container-image-test: $*"; }

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  step "building the base image with debootstrap (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$work/rootfs" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; exit 1; }
  tar -C "$work/rootfs" -c . | docker import - "$BASE" >/dev/null
  rm -rf "$work/rootfs"
fi

step "building wheels and the agent image"
mkdir -p "$work/context"
python3 -m pip wheel -q . -w "$work/context/wheels" >"$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
cp Containerfile .dockerignore "$work/context/"
docker build -q -f "$work/context/Containerfile" --build-arg "BASE=$BASE" -t "$IMAGE" "$work/context" \
  >/dev/null 2>"$work/build.log" || { cat "$work/build.log"; exit 1; }
tests/images/build.sh >/dev/null 2>&1

step "running the agent container with the Docker socket mounted"
# As the README runs it: host networking (every health check stays on 127.0.0.1), the
# host's PID namespace (so GPU processes map to containers), listening on all addresses,
# so the agent makes its token in the mounted state dir. The test talks to 127.0.0.1 only.
docker run -d --name "$AGENT" --network host --pid host \
  -v /var/run/docker.sock:/var/run/docker.sock -v "$work/state:/var/lib/deploy-agent" \
  "$IMAGE" --port "$PORT" --advertise-host 127.0.0.1 \
  --port-range 28950-28999 --instance "$INSTANCE" >/dev/null
for _ in $(seq 100); do curl -sf "$URL/health" >/dev/null && break; sleep 0.2; done
curl -sf "$URL/health" | grep -Eq '"engine": ?"reachable"' \
  || { docker logs "$AGENT"; echo "agent container did not come up"; exit 1; }
curl -sf "$URL/health" | grep -Eq '"auth": ?"token"' || { echo "auth is not on"; exit 1; }

step "finding its token as an operator would, and being refused without it"
token=$(docker exec "$AGENT" deploy-agent token)
[ "$token" = "$(cat "$work/state/token")" ] || { echo "deploy-agent token disagrees with the file"; exit 1; }
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/services")" = 401 ] || { echo "open without a token"; exit 1; }
docker logs "$AGENT" 2>&1 | grep -qF "$token" && { echo "the token is in the log"; exit 1; }
auth=(-H "Authorization: Bearer $token")

step "deploying a service through it"
answer=$(curl -s "${auth[@]}" "$URL/deploy" -H 'Content-Type: application/json' -d '{"name": "t-container", "image": "deploy-agent-test/httpd:1"}')
echo "$answer" | grep -Eq '"status": ?"healthy"' || { echo "$answer"; docker logs "$AGENT"; exit 1; }
host=$(echo "$answer" | sed 's/.*"host": *"\([^"]*\)".*/\1/')
curl -sf "$host/health" >/dev/null
[ -s "$work/state/services.json" ] || { echo "no services.json in the mounted state dir"; exit 1; }
sleep 2  # a resync or two: the PID-namespace check has looked at the running service
curl -sf "$URL/health" | grep -Eq '"warnings": ?\[\]' \
  || { curl -s "$URL/health"; echo "warnings with --pid host"; exit 1; }

step "stopping it"
curl -sf "${auth[@]}" "$URL/stop" -H 'Content-Type: application/json' -d '{"name": "t-container"}' | grep -Eq '"ok": ?true'
[ -z "$(docker ps -aq --filter name=^/tidybot-t-container$)" ] || { echo "service container left"; exit 1; }
step "OK"
