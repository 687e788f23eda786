#!/usr/bin/env bash
# Install edge-agent on a Debian machine as a hardened systemd service (run as root, from a checkout):
#   sudo scripts/install.sh [--with-receiver] [--with-fleet] [--start] [--no-apt]
# What it does, idempotently:
#   - apt: python3-venv, libusb-1.0-0 (pyusb), ca-certificates
#   - users: edge-agent (and edge-receiver with --with-receiver, edge-fleet with --with-fleet: the fleet monitor,
#     /etc/edge-fleet/fleet.toml from config/fleet.example.toml), system accounts without a shell or login
#   - the package into /opt/edge-agent/venv, the command at /usr/local/bin/edge-agent
#   - units into /etc/systemd/system, tmpfiles into /usr/lib/tmpfiles.d, the dock udev rule into /etc/udev/rules.d
#   - /etc/edge-agent/agent.toml from config/agent.example.toml (an existing config is never overwritten)
#   - /etc/edge-agent/receiver-keys/: the platform's receipt keys the agent pins (the local receiver's with
#     --with-receiver)
# It does not start anything unless --start is given: edit the config first (agent id, broker, docks).
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX=/opt/edge-agent
# Debian's own Python: the service user must be able to run it (a pyenv under /root is not reachable).
PYTHON="${PYTHON:-/usr/bin/python3}"
WITH_RECEIVER=0
WITH_FLEET=0
START=0
APT=1
for arg in "$@"; do
  case "$arg" in
    --with-receiver) WITH_RECEIVER=1 ;;
    --with-fleet) WITH_FLEET=1 ;;
    --start) START=1 ;;
    --no-apt) APT=0 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "install: run as root (sudo $0 $*)" >&2
  exit 1
fi

say() { printf 'install: %s\n' "$*"; }

if [ "$APT" -eq 1 ]; then
  say "apt-get install python3-venv libusb-1.0-0 ca-certificates"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3 python3-venv libusb-1.0-0 ca-certificates >/dev/null
fi

add_user() {  # a system account that owns its state dir and cannot log in
  local user="$1" home="$2"
  if ! getent group "$user" >/dev/null; then groupadd --system "$user"; fi
  if ! id -u "$user" >/dev/null 2>&1; then
    useradd --system --gid "$user" --home-dir "$home" --no-create-home --shell /usr/sbin/nologin \
      --comment "edge-agent service" "$user"
    say "created system user $user"
  fi
}
add_user edge-agent /var/lib/edge-agent
getent group plugdev >/dev/null || groupadd --system plugdev
usermod --append --groups plugdev edge-agent
if [ "$WITH_RECEIVER" -eq 1 ]; then add_user edge-receiver /var/lib/edge-receiver; fi
if [ "$WITH_FLEET" -eq 1 ]; then add_user edge-fleet /var/lib/edge-fleet; fi

say "package into $PREFIX/venv"
mkdir -p "$PREFIX"
[ -x "$PREFIX/venv/bin/python" ] || "$PYTHON" -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install -q --upgrade pip
"$PREFIX/venv/bin/python" -m pip install -q --upgrade "$SRC"
install -m 0644 "$SRC/README.md" "$PREFIX/README.md" 2>/dev/null || true
ln -sf "$PREFIX/venv/bin/edge-agent" /usr/local/bin/edge-agent

say "systemd units, tmpfiles and udev rule"
install -m 0644 "$SRC/systemd/edge-agent.service" /etc/systemd/system/edge-agent.service
install -D -m 0644 "$SRC/systemd/edge-agent.tmpfiles" /usr/lib/tmpfiles.d/edge-agent.conf
if [ -f "$SRC/systemd/99-edge-agent-dock.rules" ]; then
  install -D -m 0644 "$SRC/systemd/99-edge-agent-dock.rules" /etc/udev/rules.d/99-edge-agent-dock.rules
fi
if [ "$WITH_RECEIVER" -eq 1 ]; then
  install -m 0644 "$SRC/systemd/edge-agent-receiver.service" /etc/systemd/system/edge-agent-receiver.service
  install -d -m 0750 -o root -g edge-receiver /etc/edge-receiver /etc/edge-receiver/agents
  if [ ! -e /etc/edge-receiver/receiver.toml ] && [ -f "$SRC/config/receiver.example.toml" ]; then
    install -m 0640 -o root -g edge-receiver "$SRC/config/receiver.example.toml" /etc/edge-receiver/receiver.toml
  fi
fi
if [ "$WITH_FLEET" -eq 1 ]; then
  install -m 0644 "$SRC/systemd/edge-agent-fleet.service" /etc/systemd/system/edge-agent-fleet.service
  install -d -m 0750 -o root -g edge-fleet /etc/edge-fleet
  if [ ! -e /etc/edge-fleet/fleet.toml ]; then
    install -m 0640 -o root -g edge-fleet "$SRC/config/fleet.example.toml" /etc/edge-fleet/fleet.toml
    say "wrote /etc/edge-fleet/fleet.toml from the example: set the broker and its TLS files"
  fi
fi

install -d -m 0750 -o root -g edge-agent /etc/edge-agent
# The platform's receipt keys the agent pins (mqtt.receiver_keys): root writes them, the agent reads them.
install -d -m 0755 -o root -g edge-agent /etc/edge-agent/receiver-keys
if [ "$WITH_RECEIVER" -eq 1 ]; then
  # A receiver on this host: make its receipt key and pin its public half for the local agent.
  install -d -m 0750 -o edge-receiver -g edge-receiver /var/lib/edge-receiver
  if pem=$(runuser -u edge-receiver -- /usr/local/bin/edge-agent --json receiver keys show \
           -c /etc/edge-receiver/receiver.toml | "$PREFIX/venv/bin/python" -c \
           'import json, sys; print(json.load(sys.stdin)["public_key_pem"], end="")'); then
    printf '%s' "$pem" > /etc/edge-agent/receiver-keys/local-receiver.pem
    chmod 0644 /etc/edge-agent/receiver-keys/local-receiver.pem
    say "pinned the local receiver's receipt key in /etc/edge-agent/receiver-keys/local-receiver.pem"
  else
    say "could not read the local receiver's receipt key; pin it by hand (edge-agent receiver keys show)"
  fi
fi
if [ ! -e /etc/edge-agent/agent.toml ]; then
  install -m 0640 -o root -g edge-agent "$SRC/config/agent.example.toml" /etc/edge-agent/agent.toml
  say "wrote /etc/edge-agent/agent.toml from the example: set agent.id, the broker and the docks"
fi
if command -v systemd-tmpfiles >/dev/null; then
  systemd-tmpfiles --create /usr/lib/tmpfiles.d/edge-agent.conf
fi
/usr/local/bin/edge-agent config check /etc/edge-agent/agent.toml

if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  command -v udevadm >/dev/null && udevadm control --reload || true
  if [ "$START" -eq 1 ]; then
    systemctl enable --now edge-agent.service
    [ "$WITH_RECEIVER" -eq 1 ] && systemctl enable --now edge-agent-receiver.service
    [ "$WITH_FLEET" -eq 1 ] && systemctl enable --now edge-agent-fleet.service
    systemctl --no-pager status edge-agent.service || true
  fi
else
  say "systemd is not running here (container?): units installed, not started"
fi

cat <<EOF
install: done. Next:
  1. edit /etc/edge-agent/agent.toml, then: edge-agent config check
  2. enrol the agent's key on the platform: sudo -u edge-agent edge-agent keys show
     and pin the platform's receipt key(s): copy each receiver's public key (edge-agent receiver keys show,
     on the receiver) into /etc/edge-agent/receiver-keys/<name>.pem; without one nothing is ever synced
  3. systemctl enable --now edge-agent   (status: sudo edge-agent status; journalctl -u edge-agent)
  Custodians run edge-agent commands with sudo: the audit log records who (SUDO_USER).
  With --with-fleet: edit /etc/edge-fleet/fleet.toml, systemctl enable --now edge-agent-fleet, point Prometheus
  at it (config/prometheus/, docs/OPERATIONS.md "Watching the fleet"); sudo edge-agent fleet status.
EOF
