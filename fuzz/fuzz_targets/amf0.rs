//! AMF0 decoding on arbitrary bytes; what decodes re-encodes and decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir::rtmp::amf0;

fuzz_target!(|data: &[u8]| {
    if let Ok(values) = amf0::decode_all(data) {
        let again = amf0::encode_all(&values);
        let back = amf0::decode_all(&again).expect("our own encoding decodes");
        assert_eq!(back.len(), values.len());
    }
});
