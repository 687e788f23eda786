"""The wire protocol shared by agent and platform: chunk frames, messages, JSON Schemas, the MQTT connection."""
