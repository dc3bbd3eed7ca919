// Microphone capture: Float32 at the AudioContext's rate -> PCM s16le 16 kHz mono, 20 ms frames.
// Resamples with linear interpolation when the device rate is not 16 kHz, and reports the input
// level (RMS, 0..1) for the meter.
const TARGET_RATE = 16000;
const FRAME_SAMPLES = 320; // 20 ms at 16 kHz

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / TARGET_RATE; // input samples per output sample
    this.pos = 0; // fractional read position into the pending input
    this.pending = new Float32Array(0);
    this.frame = new Int16Array(FRAME_SAMPLES);
    this.filled = 0;
    this.levelAcc = 0;
    this.levelCount = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    const channel = input[0];
    for (let i = 0; i < channel.length; i++) {
      this.levelAcc += channel[i] * channel[i];
    }
    this.levelCount += channel.length;
    if (this.levelCount >= sampleRate / 20) {
      this.port.postMessage({ type: "level", rms: Math.sqrt(this.levelAcc / this.levelCount) });
      this.levelAcc = 0;
      this.levelCount = 0;
    }
    // Append to the pending input and resample out of it.
    const merged = new Float32Array(this.pending.length + channel.length);
    merged.set(this.pending);
    merged.set(channel, this.pending.length);
    let pos = this.pos;
    while (pos + 1 < merged.length) {
      const i = Math.floor(pos);
      const frac = pos - i;
      const s = merged[i] + (merged[i + 1] - merged[i]) * frac;
      const c = Math.max(-1, Math.min(1, s));
      this.frame[this.filled++] = c < 0 ? c * 0x8000 : c * 0x7fff;
      if (this.filled === FRAME_SAMPLES) {
        const out = new Int16Array(this.frame);
        this.port.postMessage({ type: "pcm", buffer: out.buffer }, [out.buffer]);
        this.filled = 0;
      }
      pos += this.ratio;
    }
    const keep = Math.floor(pos);
    this.pending = merged.slice(keep);
    this.pos = pos - keep;
    return true;
  }
}

registerProcessor("atlas-capture", CaptureProcessor);
