"""Trust: the python-tuf client, signed chunk plans, and the fetchers (MQTT, HTTP mirror) it reads through."""
