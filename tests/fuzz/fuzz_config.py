"""Fuzz the agent configuration: a TOML file and `EDGESHIP_*` overrides, as `load_config` reads them.

Input: the TOML text, optionally followed by a line `#ENV` and `NAME=VALUE` lines (the environment). Text that is
not UTF-8 or not TOML is refused by `load_config` as a ConfigError before `parse_config` sees it; anything else
must come out of `parse_config` as an AgentConfig or a ConfigError, and an accepted config must satisfy the
validation rules: ids, broker and mirror URLs, the topic prefix, every numeric bound, the [mqtt] client
certificate (cert_file and key_file both or neither, only with mqtts://, with ca_file).
"""

from __future__ import annotations

import math
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from urllib.parse import urlsplit

from agent import config as agent_config
from agent.config import AgentConfig, parse_config
from agent.errors import ConfigError
from agent.ids import is_id
from tests.fuzz.common import check

_BASE = Path("/etc/edge-agent")


def check_config(cfg: AgentConfig) -> None:
    for value in (cfg.agent.device_id, cfg.agent.fleet, cfg.agent.group):
        check(is_id(value), f"id {value!r} accepted")
    urls = cfg.mqtt.url.split(",")
    check(len(urls) == len(set(urls)), f"a broker listed twice: {cfg.mqtt.url!r}")
    for text in urls:
        url = urlsplit(text.strip())
        check(url.scheme in ("mqtt", "mqtts") and bool(url.hostname), f"broker URL {text!r} accepted")
        check(len({urlsplit(u.strip()).scheme for u in urls}) == 1, f"mixed schemes {cfg.mqtt.url!r}")
    if cfg.mirror.http:
        check(urlsplit(cfg.mirror.http).scheme in ("http", "https"), f"mirror {cfg.mirror.http!r} accepted")
    prefix = cfg.topic_prefix
    check(prefix.endswith("/") and not prefix.startswith(("/", "$")) and "//" not in prefix
          and not any(c in prefix for c in "+#\0.*> "), f"topic prefix {prefix!r} accepted")
    for section in fields(cfg):
        values = getattr(cfg, section.name)
        for f in fields(values):
            v = getattr(values, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                check(math.isfinite(v), f"[{section.name}] {f.name} = {v!r}")
                if f.name in agent_config._BOUNDS:
                    lo, hi = agent_config._BOUNDS[f.name]
                    check(lo <= v <= hi, f"[{section.name}] {f.name} = {v!r} outside [{lo}, {hi}]")
    mqtt = cfg.mqtt
    check(bool(mqtt.cert_file) == bool(mqtt.key_file), "[mqtt] cert_file without key_file (or the reverse) accepted")
    if mqtt.cert_file:
        check(all(urlsplit(u.strip()).scheme == "mqtts" for u in urls), f"a client certificate over {mqtt.url!r}")
        check(bool(mqtt.ca_file), "[mqtt] cert_file without ca_file accepted")


def test_one_input(data: bytes) -> None:
    text_bytes, _, env_bytes = data.partition(b"\n#ENV\n")
    try:
        doc = tomllib.loads(text_bytes.decode("utf-8"))
        env_text = env_bytes.decode("utf-8")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return  # load_config: ConfigError("not valid TOML")
    env = {}
    for line in env_text.splitlines():
        name, eq, value = line.partition("=")
        if eq and name and "\0" not in line:
            env[name] = value
    try:
        cfg = parse_config(doc, env, base_dir=_BASE)
    except ConfigError:
        return
    check_config(cfg)


def main() -> None:
    from tests.fuzz.runner import fuzz

    fuzz("config", sys.argv)


if __name__ == "__main__":
    main()
