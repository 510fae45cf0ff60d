#!/usr/bin/env bash
# Refresh the dashboard's vendored JavaScript (packager/dashboard/static/vendor/) from npm: MQTT.js and uPlot,
# each with its licence and the exact version in VERSIONS. Run by hand when upgrading; nothing builds at install
# time. Usage: scripts/vendor_dashboard.sh [MQTT_VERSION] [UPLOT_VERSION]
set -euo pipefail
MQTT_VERSION="${1:-5.16.0}"
UPLOT_VERSION="${2:-1.6.32}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/packager/dashboard/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# npm pack downloads the published tarball only: no install scripts run, no dependency tree.
npm pack --silent "mqtt@$MQTT_VERSION" "uplot@$UPLOT_VERSION" >/dev/null
mkdir mqtt uplot
tar -xzf "mqtt-$MQTT_VERSION.tgz" -C mqtt --strip-components=1
tar -xzf "uplot-$UPLOT_VERSION.tgz" -C uplot --strip-components=1
mkdir -p "$dest"
cp mqtt/dist/mqtt.min.js "$dest/mqtt.min.js"
cp mqtt/LICENSE.md "$dest/mqtt.LICENSE.md"
cp uplot/dist/uPlot.iife.min.js "$dest/uPlot.iife.min.js"
cp uplot/dist/uPlot.min.css "$dest/uPlot.min.css"
cp uplot/LICENSE "$dest/uplot.LICENSE"
{
    echo "# Vendored by scripts/vendor_dashboard.sh from the npm registry; do not edit by hand."
    echo "mqtt $MQTT_VERSION MIT dist/mqtt.min.js sha256=$(sha256sum mqtt/dist/mqtt.min.js | cut -d' ' -f1)"
    echo "uplot $UPLOT_VERSION MIT dist/uPlot.iife.min.js sha256=$(sha256sum uplot/dist/uPlot.iife.min.js | cut -d' ' -f1)"
} > "$dest/VERSIONS"
echo "vendored mqtt $MQTT_VERSION and uplot $UPLOT_VERSION into $dest"
