"""Hardware and stream sources. Each module implements one interface from `drivers.base`."""
