-- The doors of Pipecat's own clients (transports/rtvi): RTVI over WebRTC ('webrtc') and over a WebSocket
-- ('rtvi_ws'), beside the Atlas protocol's WebSocket, Twilio and Daily.
ALTER TABLE public.voice_sessions DROP CONSTRAINT IF EXISTS voice_sessions_transport_check;
ALTER TABLE public.voice_sessions ADD CONSTRAINT voice_sessions_transport_check
  CHECK (transport IN ('websocket', 'twilio', 'daily', 'webrtc', 'rtvi_ws'));
