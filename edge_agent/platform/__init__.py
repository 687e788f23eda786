"""The central side: the reference receiver (and room for the fleet monitor)."""
