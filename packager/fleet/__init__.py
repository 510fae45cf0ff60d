"""The fleet's view on the workstation: `packager fleet status`, `watch` and `events` (docs/packager.md).

`view` is the pure core (messages in, rows and events out); `status`, `watch` and `events` do the MQTT I/O;
`table` renders rows with rich.
"""
