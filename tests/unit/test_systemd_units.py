"""systemd/*.service: the sandbox's exposure as `systemd-analyze security --offline=yes` scores it (at most 2.0 for
both units; CI installs systemd-analyze and must run this), the notify/watchdog/restart settings the agent's code
relies on, the Jetson drop-in, and MemoryDenyWriteExecute= against the real runtimes: a child process installs the
exact seccomp rules systemd uses for it (src/shared/seccomp-util.c: mmap with PROT_WRITE|PROT_EXEC, mprotect and
pkey_mprotect adding PROT_EXEC, shmat with SHM_EXEC all fail with EPERM) and then loads and runs onnxruntime and
LiteRT (with its XNNPACK delegate) models."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent.config import DeploySection
from examples.local_broker import Mosquitto
from packager.keystore import CREDENTIAL_NAME

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
MAX_EXPOSURE = 2.0


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, in order, per key (a key may repeat)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing in CI (.ci/run installs the systemd package)", pytrace=False)
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); CI runs this check")
    return found


@pytest.mark.parametrize("unit", ["edge-agent.service", "edgeship-refresh.service"])
def test_exposure_is_at_most_2(unit: str) -> None:
    r = subprocess.run([systemd_analyze(), "security", "--offline=yes", "--no-pager", str(UNITS / unit)],
                       capture_output=True, text=True, timeout=120, check=False)
    found = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", r.stdout)
    assert found, f"no exposure figure from systemd-analyze ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    exposure = float(found.group(1))
    worst = [line for line in r.stdout.splitlines() if line.startswith("✗")]
    assert exposure <= MAX_EXPOSURE, f"{unit}: exposure {exposure} > {MAX_EXPOSURE}:\n" + "\n".join(worst)


def test_agent_unit_notify_watchdog_and_restart() -> None:
    s = unit_settings(UNITS / "edge-agent.service")
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    watchdog = int(s["WatchdogSec"][0])
    assert 10 <= watchdog <= 120
    # starting loads the persisted model, bounded by stage_timeout_s: systemd must not time the start out first
    assert int(s["TimeoutStartSec"][0]) > DeploySection().stage_timeout_s
    # exit 0 is a stop that was asked for, 2 a configuration mistake (not restarted), 70 a hung model (restarted)
    assert s["Restart"] == ["on-failure"] and s["RestartPreventExitStatus"] == ["2"]
    assert "SuccessExitStatus" not in s
    # the config is 0600 root: the dynamic user reads it as a credential
    assert s["ExecStart"][0].split()[1:] == ["run", "--config", "${CREDENTIALS_DIRECTORY}/agent.toml"]
    assert s["LoadCredential"] == ["agent.toml:/etc/edge-agent/agent.toml"]
    assert s["StateDirectory"] == ["edge-agent"] and s["StateDirectoryMode"] == ["0700"]
    assert s["MemoryDenyWriteExecute"] == ["yes"] and s["CapabilityBoundingSet"] == [""]


def test_refresh_unit_runs_as_its_own_user_without_the_root_keys() -> None:
    s = unit_settings(UNITS / "edgeship-refresh.service")
    assert s["User"] == ["edgeship"] and "DynamicUser" not in s
    assert s["ReadWritePaths"] == ["/srv/edgeship/repo"]
    # nor the fleet CA's key nor the content-key escrow, which open with the same online passphrase
    assert s["InaccessiblePaths"] == ["-/srv/edgeship/repo-root-keys -/srv/edgeship/repo/ca "
                                      "-/srv/edgeship/repo/content-keys"]
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    # the online keys' passphrase comes as the credential packager/keystore.py reads, never in the environment
    (credential,) = s["LoadCredentialEncrypted"]
    assert credential.split(":")[0] == CREDENTIAL_NAME
    assert not any("PASSPHRASE" in e for e in s.get("Environment", []))
    # the broker takes only certified clients and only the packager's identity writes TUF topics (docs/security.md);
    # tests/integration/test_identity_rules.py runs this ExecStart against such a broker
    env = dict(e.split("=", 1) for e in s["Environment"])
    assert env["EDGESHIP_BROKER"].startswith("mqtts://")
    for option, name in (("--ca-file", "EDGESHIP_CA_FILE"), ("--cert-file", "EDGESHIP_CERT_FILE"),
                         ("--key-file", "EDGESHIP_KEY_FILE")):
        assert f'{option} "${name}"' in s["ExecStart"][0] and env[name].startswith("/srv/edgeship/identity/")


def test_jetson_drop_in_opens_the_gpu_devices_only() -> None:
    s = unit_settings(UNITS / "edge-agent.service.d" / "jetson-gpu.conf.example")
    assert s["PrivateDevices"] == ["no"] and s["DevicePolicy"] == ["closed"]
    allowed = [v.split()[0] for v in s["DeviceAllow"]]
    assert "/dev/nvhost-ctrl" in allowed and "/dev/nvmap" in allowed
    assert all(a.startswith("/dev/nv") for a in allowed), allowed


MDWE_CHILD = textwrap.dedent("""
    import ctypes, ctypes.util, errno, mmap, sys
    import numpy as np

    class Cmp(ctypes.Structure):  # struct scmp_arg_cmp
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(Cmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    SCMP_ACT_ALLOW, SCMP_CMP_MASKED_EQ = 0x7FFF0000, 7
    deny = 0x00050000 | errno.EPERM  # SCMP_ACT_ERRNO(EPERM)
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    W, X, SHM_EXEC = mmap.PROT_WRITE, mmap.PROT_EXEC, 0o100000
    for name, mask in (("mmap", W | X), ("mprotect", X), ("pkey_mprotect", X), ("shmat", SHM_EXEC)):
        cmp = Cmp(2, SCMP_CMP_MASKED_EQ, mask, mask)  # the third argument (prot / shmflg) has all of mask
        assert lib.seccomp_rule_add_array(ctx, deny, lib.seccomp_syscall_resolve_name(name.encode()), 1,
                                          ctypes.byref(cmp)) == 0, name
    assert lib.seccomp_load(ctx) == 0
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | W | X)
        sys.exit("the filter is not active: a writable+executable mapping was allowed")
    except OSError as e:
        assert e.errno == errno.EPERM, e

    if sys.argv[1] == "refresh":  # edgeship-refresh.service's command
        from packager.cli import main
        sys.exit(main(["refresh", "--repo", sys.argv[2], "--broker", sys.argv[3], "--fleet", "f", "--force-snapshot"]))
    from agent.runtime import open_session
    for fmt, path in (("onnx", sys.argv[1]), ("tflite", sys.argv[2])):
        session = open_session(path, fmt)
        feeds = {s.name: np.ones([1] + [int(d) for d in s.shape[1:]], s.dtype) for s in session.inputs}
        out = session.run(feeds)
        print(fmt, session.format, [o.shape for o in out], flush=True)
""")


def _onnx_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 8])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


@pytest.mark.slow
def test_runtimes_load_and_run_under_memory_deny_write_execute(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("seccomp is Linux's")
    torch = pytest.importorskip("torch")
    from packager.tflite_convert import convert_int8_tflite

    onnx_path, tflite_path = tmp_path / "m.onnx", tmp_path / "m.int8.tflite"
    _onnx_model(onnx_path)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 10))
    calib = [(torch.randn(1, 1, 8, 8),) for _ in range(8)]
    convert_int8_tflite(net, calib[0], calib, tflite_path)
    r = subprocess.run([sys.executable, "-c", MDWE_CHILD, str(onnx_path), str(tflite_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, f"a runtime failed under MemoryDenyWriteExecute=yes ({r.returncode}):\n{r.stderr}"
    assert r.stdout.splitlines() == ["onnx onnx [(1, 8)]", "tflite tflite [(1, 10)]"], r.stdout


@pytest.mark.slow
def test_packager_refresh_runs_under_memory_deny_write_execute(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """edgeship-refresh.service's `packager refresh` (TUF signing: cryptography, securesystemslib; paho) under the
    same seccomp rules."""
    if not sys.platform.startswith("linux"):
        pytest.skip("seccomp is Linux's")
    from packager import tuf_repo

    repo = tmp_path / "repo"
    tuf_repo.init_repo(repo)
    r = subprocess.run([sys.executable, "-c", MDWE_CHILD, "refresh", str(repo), mosquitto.url], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, f"packager refresh failed under MemoryDenyWriteExecute=yes ({r.returncode}):\n{r.stderr}"
    assert "timestamp v2" in r.stdout, r.stdout

