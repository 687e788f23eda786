"""edge-agent: collects enforcement footage, seals it and syncs it to the central platform."""

__version__ = "0.1.0"
