"""Where evidence comes from: docked recorders (docks, recorder models and identity) and cameras."""
