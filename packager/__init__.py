"""edgeship packager: builds, signs and publishes model bundles from a workstation."""

__version__ = "0.1.0"
