"""Size limits shared by more than one transport (pure constants, no imports), so they cannot drift apart."""

from __future__ import annotations

# The largest inference request the agent takes: the HTTP body limit and the MQTT maximum packet size the agent
# advertises in CONNECT are this one number. An MQTT request's payload must fit together with its topic and
# properties (a few hundred bytes); the broker drops a packet over the advertised size without telling anyone.
MAX_MESSAGE_BYTES = 16 << 20
