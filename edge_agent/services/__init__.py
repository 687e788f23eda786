"""What the CLI (and later the status page) calls: one function per use case, returning dataclasses."""
