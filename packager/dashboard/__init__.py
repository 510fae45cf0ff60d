"""`packager dashboard`: a static page, served from the installed package, that reads the fleet from the broker's
MQTT WebSocket listener in the browser (docs/dashboard.md)."""
