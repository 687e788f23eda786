"""Documents and their proof: signed manifests, the chain, keys and rotation, verify, scrub, export, custody."""
