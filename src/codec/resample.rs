//! A streaming polyphase windowed-sinc resampler for any integer rate pair
//! (44.1 kHz → 48 kHz is 160/147). Its delay is half the filter: 16 input samples,
//! a third of a millisecond at 44.1 kHz, so it costs the bridge nothing noticeable.

/// Taps per phase.
const TAPS: usize = 32;
const HALF: usize = TAPS / 2;

pub struct Resampler {
    /// Upsampling and decimation factors: out/in = l/m.
    l: usize,
    m: usize,
    channels: usize,
    /// `l` phases of `TAPS` coefficients.
    table: Vec<f32>,
    /// Interleaved input not yet fully used; `buf[0]` is input frame `base`.
    buf: Vec<f32>,
    base: u64,
    /// Index of the next output frame.
    next_out: u64,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Resampler {
    /// `None` if a rate is zero or the ratio needs absurdly many phases.
    pub fn new(input_rate: u32, output_rate: u32, channels: usize) -> Option<Self> {
        if input_rate == 0 || output_rate == 0 || channels == 0 {
            return None;
        }
        let g = gcd(input_rate as usize, output_rate as usize);
        let (l, m) = (output_rate as usize / g, input_rate as usize / g);
        if l > 4096 {
            return None;
        }
        // Low-pass at the lower Nyquist, a little inside it.
        let cutoff = (l as f64 / m as f64).min(1.0) * 0.92;
        let mut table = vec![0f32; l * TAPS];
        for p in 0..l {
            let frac = p as f64 / l as f64;
            let mut sum = 0.0;
            for k in 0..TAPS {
                // Distance from the output instant (i + frac) to input sample i - HALF + 1 + k.
                let t = (HALF as f64 - 1.0 - k as f64) + frac;
                let x = std::f64::consts::PI * t * cutoff;
                let sinc = if x.abs() < 1e-9 { 1.0 } else { x.sin() / x };
                // Blackman window over the filter span.
                let w_pos = (t + HALF as f64) / TAPS as f64;
                let w = 0.42 - 0.5 * (2.0 * std::f64::consts::PI * w_pos).cos()
                    + 0.08 * (4.0 * std::f64::consts::PI * w_pos).cos();
                let c = sinc * w.max(0.0);
                table[p * TAPS + k] = c as f32;
                sum += c;
            }
            for k in 0..TAPS {
                table[p * TAPS + k] /= sum as f32; // unity gain at DC
            }
        }
        // Silence before the input so the first output has a full filter span; its
        // length is a multiple of `m` so output 0 falls exactly on input frame 0.
        let pad = m * (HALF - 1).div_ceil(m);
        Some(Self {
            l,
            m,
            channels,
            table,
            buf: vec![0.0; pad * channels],
            base: 0,
            next_out: (pad * l / m) as u64,
        })
    }

    /// Resamples interleaved `input`, appending interleaved output to `out`.
    pub fn process(&mut self, input: &[f32], out: &mut Vec<f32>) {
        let ch = self.channels;
        self.buf.extend_from_slice(input);
        let have = self.base + (self.buf.len() / ch) as u64;
        loop {
            let pos = self.next_out * self.m as u64;
            let i = pos / self.l as u64;
            let phase = (pos % self.l as u64) as usize;
            // Needs input frames i - HALF + 1 ..= i + HALF.
            if i + HALF as u64 >= have {
                break;
            }
            let start = (i + 1 - HALF as u64 - self.base) as usize;
            let coeffs = &self.table[phase * TAPS..(phase + 1) * TAPS];
            for c in 0..ch {
                let mut acc = 0f32;
                for (k, h) in coeffs.iter().enumerate() {
                    acc += h * self.buf[(start + k) * ch + c];
                }
                out.push(acc);
            }
            self.next_out += 1;
        }
        // Drop input no future output needs.
        let pos = self.next_out * self.m as u64;
        let first_needed = (pos / self.l as u64 + 1).saturating_sub(HALF as u64);
        if first_needed > self.base {
            let drop = ((first_needed - self.base) as usize).min(self.buf.len() / ch);
            self.buf.drain(..drop * ch);
            self.base += drop as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, freq: f64, frames: usize) -> Vec<f32> {
        (0..frames)
            .map(|n| {
                (2.0 * std::f64::consts::PI * freq * n as f64 / rate as f64).sin() as f32 * 0.5
            })
            .collect()
    }

    #[test]
    fn rate_and_tone_preserved() {
        let input = tone(44100, 1000.0, 44100);
        let mut r = Resampler::new(44100, 48000, 1).unwrap();
        let mut out = Vec::new();
        for chunk in input.chunks(1024) {
            r.process(chunk, &mut out);
        }
        // One second in, one second out (less the filter's half-length).
        assert!((47_950..=48_000).contains(&out.len()), "{}", out.len());
        // Compare with the ideal 48 kHz tone, away from the start.
        let ideal = tone(48000, 1000.0, out.len());
        let err: f64 = out[1000..40000]
            .iter()
            .zip(&ideal[1000..40000])
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            / 39000.0;
        let snr = 10.0 * (0.125 / err).log10();
        assert!(snr > 40.0, "SNR {snr:.1} dB");
    }

    #[test]
    fn stereo_and_identity_and_bad_rates() {
        let mut r = Resampler::new(48000, 48000, 2).unwrap();
        let input: Vec<f32> = (0..2000).map(|i| (i % 7) as f32).collect();
        let mut out = Vec::new();
        r.process(&input, &mut out);
        assert_eq!(out.len() % 2, 0);
        assert!(Resampler::new(0, 48000, 1).is_none());
        assert!(Resampler::new(48000, 48000, 0).is_none());
    }
}
