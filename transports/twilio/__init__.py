"""The phone door: Twilio's voice webhook and Media Streams on `/twilio/ws`."""
