"""The packager's typed errors. Each maps to one line on stderr and an exit status."""

from agent.errors import EdgeshipError


class PackagerError(EdgeshipError):
    exit_code = 2


class InputError(PackagerError):
    """A file or argument the user gave is missing, unreadable or does not fit the model."""


class ConversionError(PackagerError):
    """An exporter, quantizer or converter could not handle the model."""


class AccuracyGateError(PackagerError):
    """An int8 artifact lost more accuracy than --max-drop allows."""

    exit_code = 3
