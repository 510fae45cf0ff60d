#!/usr/bin/env bash
# make arm64-check (not in CI; needs root, debootstrap, qemu-user-static and binfmt_misc): does the device package
# install and work on arm64 Debian bookworm, the base of Raspberry Pi OS? Builds the wheel (make dist), makes an
# arm64 bookworm root with debootstrap (kept in $ARM64_ROOT for the next run), pip-installs the wheel into
# /opt/edgeship inside it under qemu-user-static (so every dependency must have an arm64 wheel or build there:
# nothing x86-only), then runs, inside the root, against a bundle built and published here to a local mosquitto:
#   edge-agent verify BUNDLE
#   edge-agent install --config ... --root ...   (the runtime probe's import check: emulated runtimes may crash
#                                                 where real boards do not; the probe reports it and moves on)
#   edge-agent fetch --config ... --json
# Output and the transcript: out/arm64-check/. docs/install-device.md says what it showed last.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ARM64_ROOT:-$PWD/out/arm64-root}
OUT=$PWD/out/arm64-check
PY=.venv/bin/python

[ "$(id -u)" = 0 ] || { echo "arm64-check: run as root (debootstrap, chroot)" >&2; exit 2; }
for tool in debootstrap qemu-aarch64-static update-binfmts; do
    command -v "$tool" >/dev/null || { echo "arm64-check: $tool is missing (apt-get install debootstrap qemu-user-static binfmt-support)" >&2; exit 2; }
done
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

if [ ! -x "$ROOT/usr/bin/python3" ]; then
    echo "== debootstrap arm64 bookworm into $ROOT (minutes: every package is configured under emulation)"
    mkdir -p "$ROOT"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$ROOT"
fi

echo "== make dist"
rm -rf dist
$PY -m build --outdir dist . >/dev/null
WHEEL=$(ls dist/edgeship-*.whl)

rm -rf "$OUT" && mkdir -p "$OUT"
STAGE=$ROOT/tmp/edgeship
rm -rf "$STAGE" && mkdir -p "$STAGE"
cp "$WHEEL" "$STAGE/"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# pip inside the root trusts what pip here trusts (a proxy's CA named by PIP_CERT, where there is one)
PIP_ENV=""
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
    cp "$PIP_CERT" "$ROOT/etc/ssl/host-pip-ca.crt"
    # Debian's pip reads the CA file from these (PIP_CERT alone is not enough for it)
    PIP_ENV="PIP_CERT=/etc/ssl/host-pip-ca.crt SSL_CERT_FILE=/etc/ssl/host-pip-ca.crt REQUESTS_CA_BUNDLE=/etc/ssl/host-pip-ca.crt"
fi

cleanup() {
    umount "$ROOT/proc" 2>/dev/null || true
    umount "$ROOT/dev" 2>/dev/null || true
}
trap cleanup EXIT
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"

echo "== pip install $(basename "$WHEEL") into /opt/edgeship (arm64, emulated)"
chroot "$ROOT" /bin/sh -c "uname -m; python3 --version; rm -rf /opt/edgeship && python3 -m venv /opt/edgeship && \
    env $PIP_ENV /opt/edgeship/bin/pip install --quiet --disable-pip-version-check /tmp/edgeship/$(basename "$WHEEL") && \
    /opt/edgeship/bin/pip list --format=freeze" 2>&1 | tee "$OUT/pip.txt"
du -sh "$ROOT/opt/edgeship" | tee "$OUT/venv-size.txt"

echo "== a bundle, signed and published to a local mosquitto; the agent in the arm64 root fetches it"
$PY - "$ROOT" "$OUT" <<'EOF'
import json, subprocess, sys, uuid
from pathlib import Path

from examples.digits.train import train_digits
from examples.local_broker import Mosquitto
from packager import tuf_repo
from packager.build import BuildOptions, Progress, build
from packager.publish import topics_for

root, out = Path(sys.argv[1]), Path(sys.argv[2])
stage = root / "tmp" / "edgeship"
paths = train_digits(stage / "digits", epochs=2)
opts = BuildOptions(model=str(paths["exported_program"]), calib=paths["calib"], eval=paths["eval"],
                    out_dir=stage / "out", name="digits", version=1, formats=("onnx", "tflite"))
bundle = build(opts, Progress(0, enabled=False)).bundle
repo = stage / "repo"
tuf_repo.init_repo(repo)
(stage / "root.json").write_bytes(tuf_repo.provisioning_root(repo).read_bytes())
fleet = f"arm{uuid.uuid4().hex[:8]}"
(out / "mosquitto").mkdir()
broker = Mosquitto(out / "mosquitto")
broker.start()
try:
    subprocess.run([".venv/bin/packager", "publish", str(bundle), "--repo", str(repo), "--broker", broker.url,
                    "--fleet", fleet, "--group", "lab"], check=True)
    inside = Path("/tmp/edgeship")
    (stage / "agent.toml").write_text(
        f'[agent]\ndevice_id = "arm64-1"\nstate_dir = "/var/lib/edge-agent"\nfleet = "{fleet}"\ngroup = "lab"\n'
        f'[mqtt]\nurl = "{broker.url}"\n[trust]\nroot = "{inside / "root.json"}"\n')
    rel = bundle.relative_to(stage)
    steps = {
        "verify": f"/opt/edgeship/bin/edge-agent verify {inside / rel} --json",
        "install": (f"/opt/edgeship/bin/edge-agent install --config {inside / 'agent.toml'} --root "
                    f"{inside / 'root.json'} --unit-dir /tmp/edgeship/units --force --json"),
        "fetch": "/opt/edgeship/bin/edge-agent fetch --config /etc/edge-agent/agent.toml --json",
    }
    failed = []
    for name, command in steps.items():
        r = subprocess.run(["chroot", str(root), "/bin/sh", "-c", command], capture_output=True, text=True,
                           timeout=1800)
        (out / f"{name}.txt").write_text(f"$ {command}\nexit {r.returncode}\n{r.stdout}\n{r.stderr}")
        print(f"{name}: exit {r.returncode}\n{r.stdout.strip()}\n{r.stderr.strip()[-2000:]}", flush=True)
        if r.returncode != 0:
            failed.append(name)
finally:
    broker.stop()
sys.exit(f"arm64-check: failed: {', '.join(failed)}" if failed else 0)
EOF
echo "== arm64-check passed (transcript in $OUT)"
