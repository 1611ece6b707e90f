#!/usr/bin/env bash
# Screenshot a chattune report.html with headless Chromium, to check how it looks without a screen.
#
#   tools/screenshot_report.sh out/<run>/report.html [out.png] [width,height]
#
# Installs Debian's chromium and fonts-noto-cjk (for Chinese text) with apt-get when missing, unless
# SCREENSHOT_NO_INSTALL=1 (tests set it): then a missing chromium exits 3 and missing CJK fonts only warn.
# The flags keep Chromium from reaching for the network, which is closed on our machines.
# Chromium's command line has no full-page mode: the height (default 4000 px) bounds what is captured.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 ]]; then
    echo "usage: $0 REPORT.html [OUT.png] [WIDTH,HEIGHT]" >&2
    exit 2
fi
report=$(realpath "$1")
out=$(realpath -m "${2:-${report%.html}.png}")
size=${3:-1280,4000}
[[ -f $report ]] || { echo "error: $report: no such file" >&2; exit 1; }

apt_install() {
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}
no_install=${SCREENSHOT_NO_INSTALL:-0}
if ! command -v chromium >/dev/null; then
    [[ $no_install == 1 ]] && { echo "error: chromium is not installed" >&2; exit 3; }
    apt_install chromium
fi
# Without a CJK font, Chinese text in the page renders as boxes.
if ! fc-list :lang=zh family 2>/dev/null | grep -q .; then
    if [[ $no_install == 1 ]]; then
        echo "warning: no CJK font installed (apt-get install fonts-noto-cjk); Chinese shows as boxes" >&2
    else
        apt_install fonts-noto-cjk
    fi
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$out" --window-size="$size" "file://$report" 2>/dev/null
[[ -s $out ]] || { echo "error: chromium wrote no screenshot to $out" >&2; exit 1; }
echo "$out"
