"""edgeship device agent: pulls signed bundles, swaps models safely, serves inference."""

__version__ = "0.1.0"
