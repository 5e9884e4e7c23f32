//! Codec pieces of the bridge: H.264 parameter sets and packetization, the AAC
//! AudioSpecificConfig, resampling, and AAC → Opus.

pub mod aac;
pub mod aac_opus;
pub mod h264;
pub mod opus_aac;
pub mod resample;
