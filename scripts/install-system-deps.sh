#!/usr/bin/env bash
# System packages the project needs beyond Python: Debian's openclipart-png (public-domain clip art
# in category folders) for the sample catalog. Idempotent; installs only what is missing.
set -euo pipefail
if [ -d /usr/share/openclipart/png ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "openclipart-png is missing and this is not a Debian/Ubuntu system: the sample catalog needs it" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
echo "installing Debian package openclipart-png (clip art for the sample catalog)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends openclipart-png >/dev/null
