//! Fragmented MP4 from FLV tags, sans I/O: the boxes are `mp4-atom`'s, this decides
//! what goes in them. A file is `ftyp` + `moov` (one H.264 track, one AAC track, each
//! present when its sequence header was known at the start), then fragments
//! (`moof` + `mdat`), each at most about a second of media: a crash loses at most the
//! fragment being gathered, and what was written plays.
//!
//! Nothing is transcoded: a sample is an FLV tag's payload (H.264 in length-prefixed
//! NAL units, raw AAC frames). The video sample entry is `avc3`, so a change of
//! parameter sets mid-file (a WebRTC publisher changing resolution under congestion)
//! is carried in band, before the next keyframe, instead of ending the file.
//! Times: video on a 90 kHz clock, audio on its sample rate, both from the tags'
//! millisecond timestamps; each fragment's `tfdt` is exact, so nothing drifts.

use bytes::{BufMut, Bytes};
use mp4_atom::{
    Atom, Audio, Avc3, Avcc, Codec, Dinf, Dref, Encode, Esds, FourCC, Ftyp, Hdlr, Mdhd, Mdia, Mfhd,
    Minf, Moof, Moov, Mp4a, Mvex, Mvhd, Smhd, Stbl, Stco, Stsd, Tfdt, Tfhd, Tkhd, Traf, Trak, Trex,
    Trun, TrunEntry, Url, Visual, Vmhd,
};

use crate::codec::aac::AudioConfig;
use crate::codec::h264::{sps_dimensions, AvcConfig};
use crate::live::{Tag, TagKind};

/// A fragment is written once it holds this much media…
const FRAGMENT_MS: u32 = 1000;
/// …or this many bytes (a bound on what a crash loses and on memory).
const FRAGMENT_BYTES: usize = 8 << 20;
const VIDEO_TIMESCALE: u32 = 90_000;
const VIDEO_TRACK: u32 = 1;
const AUDIO_TRACK: u32 = 2;
/// `sample_depends_on` = 2 (an I frame); sync.
const SYNC: u32 = 0x0200_0000;
/// `sample_depends_on` = 1; `sample_is_non_sync_sample`.
const NON_SYNC: u32 = 0x0101_0000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mp4Error {
    #[error("the video sequence header is not an AVCDecoderConfigurationRecord: {0}")]
    Video(String),
    #[error("the audio sequence header is not an AudioSpecificConfig: {0}")]
    Audio(String),
    #[error("neither video nor audio to record")]
    Empty,
    #[error("new parameters this file cannot carry: {0}")]
    NewFile(&'static str),
    #[error("encoding a box: {0}")]
    Encode(String),
}

struct Sample {
    /// Decode time on the track's clock.
    dts: u64,
    size: u32,
    flags: u32,
    /// Composition offset, track clock.
    cts: i32,
}

struct Track {
    id: u32,
    timescale: u32,
    samples: Vec<Sample>,
    data: Vec<u8>,
    /// The duration given to a fragment's last sample, whose successor is not known
    /// yet: the previous one's (the next fragment's `tfdt` is exact anyway).
    last_duration: u32,
}

impl Track {
    fn new(id: u32, timescale: u32, default_duration: u32) -> Self {
        Self {
            id,
            timescale,
            samples: Vec::new(),
            data: Vec::new(),
            last_duration: default_duration,
        }
    }

    fn ticks(&self, ms: u32) -> u64 {
        u64::from(ms) * u64::from(self.timescale) / 1000
    }

    fn push(&mut self, ms: u32, payload: &[&[u8]], flags: u32, cts: i32) {
        // Decode times never step back within a track (a pusher's jitter).
        let dts = self.ticks(ms).max(self.samples.last().map_or(0, |s| s.dts));
        let size: usize = payload.iter().map(|p| p.len()).sum();
        for p in payload {
            self.data.extend_from_slice(p);
        }
        self.samples.push(Sample {
            dts,
            size: size as u32,
            flags,
            cts,
        });
    }

    /// This fragment's run of the track; `next_dts` is its next sample's, if known.
    fn traf(&mut self, next_dts: Option<u64>) -> Option<Traf> {
        let first = self.samples.first()?.dts;
        let n = self.samples.len();
        let mut entries = Vec::with_capacity(n);
        for i in 0..n {
            let next = if i + 1 < n {
                Some(self.samples[i + 1].dts)
            } else {
                next_dts
            };
            let duration = match next {
                Some(d) => (d.saturating_sub(self.samples[i].dts)).min(u64::from(u32::MAX)) as u32,
                None => self.last_duration,
            };
            if next.is_some() && duration > 0 {
                self.last_duration = duration;
            }
            let s = &self.samples[i];
            entries.push(TrunEntry {
                duration: Some(duration),
                size: Some(s.size),
                flags: Some(s.flags),
                cts: Some(s.cts),
            });
        }
        Some(Traf {
            tfhd: Tfhd {
                track_id: self.id,
                default_base_is_moof: true,
                ..Default::default()
            },
            tfdt: Some(Tfdt {
                base_media_decode_time: first,
            }),
            trun: vec![Trun {
                data_offset: Some(0),
                entries,
            }],
            ..Default::default()
        })
    }
}

pub struct Mp4Writer {
    video: Option<Track>,
    audio: Option<Track>,
    /// NAL length size of the file's H.264 (from its first configuration).
    length_size: usize,
    /// Parameter sets changed mid-file, put before the next keyframe.
    in_band: Option<Vec<u8>>,
    sequence: u32,
    /// The first pending sample's timestamp (ms) and the pending bytes.
    pending_since: Option<u32>,
    pending_bytes: usize,
}

fn encode(atom: &impl Encode, out: &mut Vec<u8>) -> Result<(), Mp4Error> {
    atom.encode(out)
        .map_err(|e| Mp4Error::Encode(e.to_string()))
}

impl Mp4Writer {
    /// A file for a stream with these sequence headers (FLV tag bodies); returns the
    /// writer and the file's head (`ftyp` + `moov`).
    pub fn open(
        video_header: Option<&Tag>,
        audio_header: Option<&Tag>,
    ) -> Result<(Self, Bytes), Mp4Error> {
        let mut traks = Vec::new();
        let mut trex = Vec::new();
        let mut video = None;
        let mut length_size = 4;
        if let Some(h) = video_header {
            let record = h.data.slice(5.min(h.data.len())..);
            let config = AvcConfig::parse(&record).map_err(|e| Mp4Error::Video(e.to_string()))?;
            length_size = config.length_size;
            let avcc =
                Avcc::decode_body(&mut &record[..]).map_err(|e| Mp4Error::Video(e.to_string()))?;
            let (w, h) = config
                .sps
                .first()
                .and_then(|s| sps_dimensions(s).ok())
                .unwrap_or((0, 0));
            let (w, h) = (
                w.min(u32::from(u16::MAX)) as u16,
                h.min(u32::from(u16::MAX)) as u16,
            );
            let entry = Avc3 {
                visual: Visual {
                    data_reference_index: 1,
                    width: w,
                    height: h,
                    horizresolution: 72.into(),
                    vertresolution: 72.into(),
                    frame_count: 1,
                    compressor: "".into(),
                    depth: 24,
                },
                avcc,
                ..Default::default()
            };
            traks.push(trak(
                VIDEO_TRACK,
                VIDEO_TIMESCALE,
                (w, h),
                b"vide",
                "Video",
                Codec::Avc3(entry),
            ));
            trex.push(trex_for(VIDEO_TRACK));
            video = Some(Track::new(
                VIDEO_TRACK,
                VIDEO_TIMESCALE,
                VIDEO_TIMESCALE / 30,
            ));
        }
        let mut audio = None;
        // An audio header that is not an AudioSpecificConfig (or not AAC) leaves the
        // file without sound rather than without picture; alone, nothing is written.
        let audio_config = audio_header.map(|h| {
            let asc = h.data.get(2..).unwrap_or_default();
            let aac = h.data.first().is_some_and(|b| b >> 4 == 10);
            let c = if aac {
                AudioConfig::read(asc).map_err(|e| Mp4Error::Audio(e.to_string()))
            } else {
                Err(Mp4Error::Audio("not AAC".into()))
            };
            (asc, c)
        });
        let audio_config = match audio_config {
            Some((asc, Ok(c))) => Some((asc, c)),
            Some((_, Err(e))) if video.is_none() => return Err(e),
            _ => None,
        };
        if let Some((asc, c)) = audio_config {
            let freq_index = (asc.first().copied().unwrap_or(0) & 0x07) << 1
                | asc.get(1).copied().unwrap_or(0) >> 7;
            let entry = Mp4a {
                audio: Audio {
                    data_reference_index: 1,
                    channel_count: u16::from(c.channels.max(1)),
                    sample_size: 16,
                    sample_rate: (c.sample_rate.min(u32::from(u16::MAX)) as u16).into(),
                },
                esds: Esds {
                    es_desc: mp4_atom::esds::EsDescriptor {
                        es_id: AUDIO_TRACK as u16,
                        dec_config: mp4_atom::esds::DecoderConfig {
                            // MPEG-4 audio, an audio stream.
                            object_type_indication: 0x40,
                            stream_type: 5,
                            up_stream: 0,
                            buffer_size_db: Default::default(),
                            max_bitrate: 0,
                            avg_bitrate: 0,
                            dec_specific: Some(mp4_atom::esds::DecoderSpecific {
                                profile: c.object_type,
                                freq_index,
                                chan_conf: c.channels,
                                raw: asc.to_vec(),
                            }),
                        },
                        sl_config: Default::default(),
                    },
                },
                btrt: None,
                taic: None,
            };
            traks.push(trak(
                AUDIO_TRACK,
                c.sample_rate,
                (0, 0),
                b"soun",
                "Audio",
                Codec::Mp4a(entry),
            ));
            trex.push(trex_for(AUDIO_TRACK));
            audio = Some(Track::new(AUDIO_TRACK, c.sample_rate, 1024));
        }
        if traks.is_empty() {
            return Err(Mp4Error::Empty);
        }
        let moov = Moov {
            mvhd: Mvhd {
                timescale: 1000,
                rate: 1.into(),
                volume: 1.into(),
                next_track_id: AUDIO_TRACK + 1,
                ..Default::default()
            },
            mvex: Some(Mvex { mehd: None, trex }),
            trak: traks,
            ..Default::default()
        };
        let ftyp = Ftyp {
            major_brand: FourCC::new(b"iso6"),
            minor_version: 0,
            compatible_brands: [b"iso6", b"isom", b"iso2", b"avc1", b"mp41"]
                .into_iter()
                .map(FourCC::new)
                .collect(),
        };
        let mut head = Vec::new();
        encode(&ftyp, &mut head)?;
        encode(&moov, &mut head)?;
        Ok((
            Self {
                video,
                audio,
                length_size,
                in_band: None,
                sequence: 0,
                pending_since: None,
                pending_bytes: 0,
            },
            head.into(),
        ))
    }

    /// A sequence header that differs from the last: new H.264 parameter sets are
    /// carried in band; anything else needs a new file.
    pub fn header_changed(&mut self, tag: &Tag) -> Result<(), Mp4Error> {
        match tag.kind {
            TagKind::Video if self.video.is_some() => {
                let record = tag.data.slice(5.min(tag.data.len())..);
                let config =
                    AvcConfig::parse(&record).map_err(|e| Mp4Error::Video(e.to_string()))?;
                if config.length_size != self.length_size {
                    return Err(Mp4Error::NewFile("another NAL length size"));
                }
                let mut sets = Vec::new();
                for nal in config.sps.iter().chain(&config.pps) {
                    put_length(&mut sets, nal.len(), self.length_size);
                    sets.extend_from_slice(nal);
                }
                self.in_band = Some(sets);
                Ok(())
            }
            TagKind::Video => Err(Mp4Error::NewFile("video began after the file")),
            _ => Err(Mp4Error::NewFile("another audio configuration")),
        }
    }

    /// One tag (its timestamp relative to the file); complete fragments are appended
    /// to `out`. Tags of a track the file does not have, and tags that are not media
    /// (an end of sequence), are left out.
    pub fn sample(&mut self, tag: &Tag, out: &mut Vec<Bytes>) {
        let d = &tag.data;
        match tag.kind {
            // AVC (codec 7), a NAL unit packet (1).
            TagKind::Video if d.len() > 5 && d[0] & 0x0f == 7 && d[1] == 1 => {
                let key = tag.is_video_keyframe();
                if key && self.pending_since.is_some() {
                    // Fragments start at keyframes when they can.
                    let next = self.video.as_ref().map(|v| v.ticks(tag.timestamp));
                    self.flush(next, out);
                }
                let cts_ms = i32::from_be_bytes([d[2], d[3], d[4], 0]) >> 8;
                let Some(v) = self.video.as_mut() else { return };
                let cts = cts_ms.saturating_mul((VIDEO_TIMESCALE / 1000) as i32);
                let sets = if key { self.in_band.take() } else { None };
                let sets = sets.unwrap_or_default();
                let flags = if key { SYNC } else { NON_SYNC };
                v.push(tag.timestamp, &[&sets, &d[5..]], flags, cts);
                self.pending_bytes += sets.len() + d.len() - 5;
            }
            // AAC (10), a raw frame (1).
            TagKind::Audio if d.len() > 2 && d[0] >> 4 == 10 && d[1] == 1 => {
                let Some(a) = self.audio.as_mut() else { return };
                a.push(tag.timestamp, &[&d[2..]], SYNC, 0);
                self.pending_bytes += d.len() - 2;
            }
            _ => return,
        }
        let since = *self.pending_since.get_or_insert(tag.timestamp);
        if tag.timestamp.saturating_sub(since) >= FRAGMENT_MS
            || self.pending_bytes >= FRAGMENT_BYTES
        {
            self.flush(None, out);
        }
    }

    /// The file ends: what is gathered is written.
    pub fn finish(&mut self, out: &mut Vec<Bytes>) {
        self.flush(None, out);
    }

    fn flush(&mut self, next_video_dts: Option<u64>, out: &mut Vec<Bytes>) {
        if self.pending_since.take().is_none() {
            return;
        }
        self.pending_bytes = 0;
        self.sequence += 1;
        let mut trafs = Vec::new();
        let mut data: Vec<Vec<u8>> = Vec::new();
        for (track, next) in [(&mut self.video, next_video_dts), (&mut self.audio, None)] {
            let Some(t) = track.as_mut() else { continue };
            if let Some(traf) = t.traf(next) {
                trafs.push(traf);
                data.push(std::mem::take(&mut t.data));
                t.samples.clear();
            }
        }
        let mut moof = Moof {
            mfhd: Mfhd {
                sequence_number: self.sequence,
            },
            traf: trafs,
        };
        // Offsets are from the moof's start (`default_base_is_moof`): its size (which
        // the offsets do not change), the mdat's header, the tracks before.
        let mut sized = Vec::new();
        if encode(&moof, &mut sized).is_err() {
            return;
        }
        let mut offset = sized.len() + 8;
        for (traf, d) in moof.traf.iter_mut().zip(&data) {
            traf.trun[0].data_offset = Some(offset as i32);
            offset += d.len();
        }
        let total: usize = data.iter().map(Vec::len).sum();
        let mut b = Vec::with_capacity(sized.len() + 8 + total);
        if encode(&moof, &mut b).is_err() {
            return;
        }
        b.put_u32((8 + total) as u32);
        b.put_slice(b"mdat");
        for d in &data {
            b.put_slice(d);
        }
        out.push(b.into());
    }
}

fn put_length(out: &mut Vec<u8>, len: usize, size: usize) {
    let bytes = (len as u32).to_be_bytes();
    out.extend_from_slice(&bytes[4 - size.min(4)..]);
}

fn trex_for(track_id: u32) -> Trex {
    Trex {
        track_id,
        default_sample_description_index: 1,
        ..Default::default()
    }
}

fn trak(
    id: u32,
    timescale: u32,
    (w, h): (u16, u16),
    handler: &[u8; 4],
    name: &str,
    codec: Codec,
) -> Trak {
    let video = handler == b"vide";
    Trak {
        tkhd: Tkhd {
            track_id: id,
            enabled: true,
            in_movie: true,
            alternate_group: u16::from(!video),
            volume: u8::from(!video).into(),
            width: w.into(),
            height: h.into(),
            ..Default::default()
        },
        mdia: Mdia {
            mdhd: Mdhd {
                timescale,
                language: "und".into(),
                ..Default::default()
            },
            hdlr: Hdlr {
                handler: FourCC::new(handler),
                name: name.into(),
            },
            minf: Minf {
                vmhd: video.then(Vmhd::default),
                smhd: (!video).then(Smhd::default),
                dinf: Dinf {
                    dref: Dref {
                        urls: vec![Url::default()],
                    },
                },
                stbl: Stbl {
                    stsd: Stsd {
                        codecs: vec![codec],
                    },
                    stco: Some(Stco::default()),
                    ..Default::default()
                },
                ..Default::default()
            },
        },
        ..Default::default()
    }
}
