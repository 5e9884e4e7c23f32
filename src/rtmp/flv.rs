//! FLV tag bodies as RTMP carries them: AVC video and AAC audio, plus the
//! Enhanced-RTMP header bit (recognized so it can be refused clearly).

use bytes::Bytes;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlvError {
    #[error("empty {0} tag")]
    Empty(&'static str),
    #[error("{what} tag of {len} bytes is too short")]
    Short { what: &'static str, len: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VideoTag {
    /// The AVCDecoderConfigurationRecord.
    AvcSequenceHeader(Bytes),
    /// Length-prefixed NAL units of one access unit.
    AvcNalus {
        keyframe: bool,
        /// PTS − DTS in milliseconds.
        composition_time: i32,
        data: Bytes,
    },
    AvcEndOfSequence,
    /// Another codec: legacy codec id, or an Enhanced-RTMP FourCC.
    Unsupported(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudioTag {
    /// The AudioSpecificConfig.
    AacSequenceHeader(Bytes),
    AacRaw(Bytes),
    Unsupported(String),
}

pub fn parse_video(data: &Bytes) -> Result<VideoTag, FlvError> {
    let b0 = *data.first().ok_or(FlvError::Empty("video"))?;
    if b0 & 0x80 != 0 {
        // Enhanced RTMP: a FourCC follows the packet type.
        let fourcc = data
            .get(1..5)
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .unwrap_or_else(|| "?".into());
        return Ok(VideoTag::Unsupported(format!(
            "Enhanced-RTMP video {fourcc:?} (only legacy AVC/H.264 is bridged)"
        )));
    }
    let frame_type = b0 >> 4;
    let codec = b0 & 0x0f;
    if codec != 7 {
        let name = match codec {
            2 => "Sorenson H.263",
            3 => "Screen video",
            4 => "VP6",
            5 => "VP6 alpha",
            6 => "Screen video v2",
            12 => "HEVC (codec id 12)",
            _ => "unknown",
        };
        return Ok(VideoTag::Unsupported(format!(
            "FLV video codec {codec} ({name})"
        )));
    }
    if frame_type == 5 {
        // Video info/command frame: no picture.
        return Ok(VideoTag::Unsupported("video info frame".into()));
    }
    if data.len() < 5 {
        return Err(FlvError::Short {
            what: "AVC video",
            len: data.len(),
        });
    }
    let ct = i32::from_be_bytes([0, data[2], data[3], data[4]]);
    let ct = (ct << 8) >> 8; // sign-extend 24 bits
    match data[1] {
        0 => Ok(VideoTag::AvcSequenceHeader(data.slice(5..))),
        1 => Ok(VideoTag::AvcNalus {
            keyframe: frame_type == 1,
            composition_time: ct,
            data: data.slice(5..),
        }),
        2 => Ok(VideoTag::AvcEndOfSequence),
        t => Ok(VideoTag::Unsupported(format!("AVC packet type {t}"))),
    }
}

pub fn parse_audio(data: &Bytes) -> Result<AudioTag, FlvError> {
    let b0 = *data.first().ok_or(FlvError::Empty("audio"))?;
    let format = b0 >> 4;
    if format != 10 {
        let name = match format {
            0 | 3 => "PCM",
            1 => "ADPCM",
            2 => "MP3",
            4..=6 => "Nellymoser",
            7 | 8 => "G.711",
            9 => "Enhanced-RTMP audio",
            11 => "Speex",
            13 => "Opus (unofficial)",
            14 => "MP3 8 kHz",
            _ => "unknown",
        };
        return Ok(AudioTag::Unsupported(format!(
            "FLV audio format {format} ({name})"
        )));
    }
    if data.len() < 2 {
        return Err(FlvError::Short {
            what: "AAC audio",
            len: data.len(),
        });
    }
    match data[1] {
        0 => Ok(AudioTag::AacSequenceHeader(data.slice(2..))),
        1 => Ok(AudioTag::AacRaw(data.slice(2..))),
        t => Ok(AudioTag::Unsupported(format!("AAC packet type {t}"))),
    }
}

/// The FLV tag header byte of an AVC video tag.
pub fn video_header(keyframe: bool, packet_type: u8, composition_time: i32) -> [u8; 5] {
    let ct = composition_time.to_be_bytes();
    [
        if keyframe { 0x17 } else { 0x27 },
        packet_type,
        ct[1],
        ct[2],
        ct[3],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn video_tags() {
        let t = parse_video(&Bytes::from_static(&[
            0x17, 1, 0xff, 0xff, 0xdf, 0, 0, 0, 1, 0x65,
        ]))
        .unwrap();
        assert_eq!(
            t,
            VideoTag::AvcNalus {
                keyframe: true,
                composition_time: -33,
                data: Bytes::from_static(&[0, 0, 0, 1, 0x65])
            }
        );
        let h = video_header(false, 1, 66);
        let t = parse_video(&Bytes::copy_from_slice(&h)).unwrap();
        assert!(matches!(
            t,
            VideoTag::AvcNalus {
                keyframe: false,
                composition_time: 66,
                ..
            }
        ));
        assert!(matches!(
            parse_video(&Bytes::from_static(&[0x1c, 0])).unwrap(),
            VideoTag::Unsupported(_)
        ));
        assert!(matches!(
            parse_video(&Bytes::from_static(&[0x90, b'h', b'v', b'c', b'1'])).unwrap(),
            VideoTag::Unsupported(s) if s.contains("hvc1")
        ));
        assert!(parse_video(&Bytes::from_static(&[0x17, 1])).is_err());
        assert!(parse_video(&Bytes::new()).is_err());
    }

    #[test]
    fn audio_tags() {
        assert_eq!(
            parse_audio(&Bytes::from_static(&[0xaf, 0, 0x12, 0x10])).unwrap(),
            AudioTag::AacSequenceHeader(Bytes::from_static(&[0x12, 0x10]))
        );
        assert!(matches!(
            parse_audio(&Bytes::from_static(&[0x2f, 0])).unwrap(),
            AudioTag::Unsupported(s) if s.contains("MP3")
        ));
        assert!(parse_audio(&Bytes::from_static(&[0xaf])).is_err());
    }
}
