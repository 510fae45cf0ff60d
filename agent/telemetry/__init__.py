"""Telemetry: resources, inference statistics, accuracy, the disk queue and its publisher (issue 9 lands here)."""
