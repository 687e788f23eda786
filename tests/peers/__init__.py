"""Real peers the tests start: mosquitto, an RTSP server, an ONVIF service, emulated USB recorders."""
