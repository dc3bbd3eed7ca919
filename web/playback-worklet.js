// Gapless playback of the server's PCM: one ring buffer, resampled from the stream's rate to the
// AudioContext's rate. `flush` drops everything queued (on interruption). It reports
// {type: "buffered", seconds, playing, played} when playback starts or stops and on a flush: `played` is
// the seconds of reply audio sent to the speakers so far.
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.capacity = sampleRate * 60; // 60 s of output
    this.ring = new Float32Array(this.capacity);
    this.read = 0;
    this.write = 0;
    this.size = 0;
    this.srcRate = sampleRate;
    this.frac = 0;
    this.last = 0;
    this.playing = false;
    this.played = 0; // samples of audio played
    this.port.onmessage = (e) => {
      const m = e.data;
      if (m.type === "format") {
        this.srcRate = m.sampleRate;
      } else if (m.type === "push") {
        this.push(new Int16Array(m.buffer));
      } else if (m.type === "flush") {
        this.read = this.write = this.size = 0;
        this.frac = 0;
        this.report();
      }
    };
  }

  push(pcm) {
    // Resample src -> context rate by linear interpolation over the continuous stream: position p
    // counts source samples from this chunk's start; p in [-1, 0) lies between the previous
    // chunk's last sample and this chunk's first.
    const step = this.srcRate / sampleRate;
    const n = pcm.length;
    let p = this.frac;
    for (;;) {
      const i = Math.floor(p);
      if (i + 1 >= n) break;
      const a = i < 0 ? this.last : pcm[i] / 32768;
      const b = pcm[i + 1] / 32768;
      const s = a + (b - a) * (p - i);
      if (this.size < this.capacity) {
        this.ring[this.write] = s;
        this.write = (this.write + 1) % this.capacity;
        this.size++;
      }
      p += step;
    }
    this.frac = p - n;
    if (n > 0) this.last = pcm[n - 1] / 32768;
  }

  report() {
    this.port.postMessage({
      type: "buffered", seconds: this.size / sampleRate, playing: this.playing, played: this.played / sampleRate,
    });
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    let n = 0;
    while (n < out.length && this.size > 0) {
      out[n++] = this.ring[this.read];
      this.read = (this.read + 1) % this.capacity;
      this.size--;
    }
    this.played += n;
    for (; n < out.length; n++) out[n] = 0;
    const playing = this.size > 0;
    if (playing !== this.playing) {
      this.playing = playing;
      this.report();
    }
    return true;
  }
}

registerProcessor("atlas-playback", PlaybackProcessor);
