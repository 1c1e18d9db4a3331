#!/usr/bin/env bash
# System packages the project needs beyond Python, both Debian's:
#   openclipart-png   public-domain clip art in category folders: the sample catalog
#   mate-backgrounds  real photos (wood, sand, plants, water; GPL-2+): backgrounds of the simulated
#                     shopper photos of `lookalike eval --simulate`
# Idempotent; installs only what is missing.
set -euo pipefail
missing=()
[ -d /usr/share/openclipart/png ] || missing+=(openclipart-png)
[ -d /usr/share/backgrounds/mate/nature ] || missing+=(mate-backgrounds)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "missing ${missing[*]} and this is not a Debian/Ubuntu system: the sample catalog and eval need them" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
echo "installing Debian packages ${missing[*]} (sample catalog, eval backgrounds)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
