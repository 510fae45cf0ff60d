"""Serving: the swappable model and its statistics, the OIP v2 codec (pure), the HTTP server, MQTT inference."""
