//! The MPEG-4 AudioSpecificConfig (the FLV AAC sequence header), and building one.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AacError {
    #[error("AudioSpecificConfig is {0} bytes; at least 2 are needed")]
    Short(usize),
    #[error("sampling frequency index {0} is reserved")]
    BadFrequency(u8),
    #[error("channel configuration {0} is not supported (mono and stereo only)")]
    Channels(u8),
    #[error(
        "audio object type {0} ({1}) is not supported; only AAC-LC (2) is bridged: \
         set the encoder to AAC-LC"
    )]
    ObjectType(u8, &'static str),
}

pub const FREQUENCIES: [u32; 13] = [
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioConfig {
    pub object_type: u8,
    pub sample_rate: u32,
    pub channels: u8,
}

fn object_name(t: u8) -> &'static str {
    match t {
        1 => "AAC Main",
        2 => "AAC-LC",
        3 => "AAC SSR",
        4 => "AAC LTP",
        5 => "HE-AAC (SBR)",
        29 => "HE-AACv2 (PS)",
        23 => "AAC-LD",
        39 => "AAC-ELD",
        _ => "other",
    }
}

impl AudioConfig {
    /// An AAC-LC configuration, mono or stereo: what the bridge decodes.
    pub fn parse(asc: &[u8]) -> Result<Self, AacError> {
        let c = Self::read(asc)?;
        if c.object_type != 2 {
            return Err(AacError::ObjectType(
                c.object_type,
                object_name(c.object_type),
            ));
        }
        if !(1..=2).contains(&c.channels) {
            return Err(AacError::Channels(c.channels));
        }
        Ok(c)
    }

    /// Any AudioSpecificConfig's object type, rate and channels, whatever they are
    /// (what a container that copies the stream needs).
    pub fn read(asc: &[u8]) -> Result<Self, AacError> {
        if asc.len() < 2 {
            return Err(AacError::Short(asc.len()));
        }
        let bits = u32::from_be_bytes([
            asc[0],
            asc[1],
            *asc.get(2).unwrap_or(&0),
            *asc.get(3).unwrap_or(&0),
        ]);
        let object_type = (bits >> 27) as u8;
        if object_type == 31 {
            return Err(AacError::ObjectType(31, "escape (object type > 31)"));
        }
        let freq_index = ((bits >> 23) & 0x0f) as u8;
        let (sample_rate, channel_shift) = if freq_index == 15 {
            if asc.len() < 5 {
                return Err(AacError::Short(asc.len()));
            }
            ((bits >> 7) & 0xff_ffff, 3)
        } else {
            let f = *FREQUENCIES
                .get(usize::from(freq_index))
                .ok_or(AacError::BadFrequency(freq_index))?;
            (f, 19)
        };
        let channels = if channel_shift == 19 {
            ((bits >> 19) & 0x0f) as u8
        } else {
            // Explicit frequency: the channel configuration is in the 5th byte's top nibble.
            ((u32::from(asc[4]) >> 3) & 0x0f) as u8
        };
        Ok(Self {
            object_type,
            sample_rate,
            channels,
        })
    }

    /// The 2-byte AudioSpecificConfig for AAC-LC at a standard rate.
    pub fn lc(sample_rate: u32, channels: u8) -> Option<[u8; 2]> {
        let idx = FREQUENCIES.iter().position(|&f| f == sample_rate)? as u16;
        let v: u16 = (2 << 11) | (idx << 7) | (u16::from(channels & 0x0f) << 3);
        Some(v.to_be_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs() {
        // 44.1 kHz stereo AAC-LC, as ffmpeg writes it.
        let c = AudioConfig::parse(&[0x12, 0x10]).unwrap();
        assert_eq!((c.sample_rate, c.channels), (44100, 2));
        let c = AudioConfig::parse(&[0x11, 0x88]).unwrap();
        assert_eq!((c.sample_rate, c.channels), (48000, 1));
        assert_eq!(AudioConfig::lc(48000, 1), Some([0x11, 0x88]));
        assert_eq!(AudioConfig::lc(44100, 2), Some([0x12, 0x10]));
        // HE-AAC: a clear refusal.
        let e = AudioConfig::parse(&[0x2b, 0x92, 0x08, 0x00]).unwrap_err();
        assert!(e.to_string().contains("HE-AAC"), "{e}");
        assert!(AudioConfig::parse(&[0x12]).is_err());
        assert!(AudioConfig::parse(&[0x16, 0x90]).is_err()); // reserved frequency index 13
    }
}
