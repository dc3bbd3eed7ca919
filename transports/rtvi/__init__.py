"""The doors of Pipecat's own clients: RTVI over WebRTC and over a WebSocket."""
