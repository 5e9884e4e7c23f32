//! AMF0, the value encoding of RTMP commands and metadata: a decoder that never
//! panics and bounds nesting and element counts, and the encoder for our replies.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Amf0 {
    Number(f64),
    Boolean(bool),
    String(String),
    Object(Vec<(String, Amf0)>),
    Null,
    Undefined,
    EcmaArray(Vec<(String, Amf0)>),
    StrictArray(Vec<Amf0>),
    Date(f64),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmfError {
    #[error("AMF0 value truncated at byte {0}")]
    Truncated(usize),
    #[error("AMF0 type marker 0x{marker:02x} at byte {at} is not supported")]
    UnsupportedMarker { marker: u8, at: usize },
    #[error("AMF0 values nested deeper than {0}")]
    TooDeep(usize),
    #[error("AMF0 message holds more than {0} values")]
    TooMany(usize),
}

/// Nesting beyond this is refused (real encoders nest two or three levels).
pub const MAX_DEPTH: usize = 16;
/// Values per message, counted at every depth.
pub const MAX_VALUES: usize = 4096;

impl Amf0 {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Amf0::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_number(&self) -> Option<f64> {
        match self {
            Amf0::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// A property of an object or ECMA array.
    pub fn get(&self, key: &str) -> Option<&Amf0> {
        match self {
            Amf0::Object(props) | Amf0::EcmaArray(props) => {
                props.iter().find(|(k, _)| k == key).map(|(_, v)| v)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Amf0 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amf0::Number(n) => write!(f, "{n}"),
            Amf0::Boolean(b) => write!(f, "{b}"),
            Amf0::String(s) => write!(f, "{s:?}"),
            Amf0::Null => f.write_str("null"),
            Amf0::Undefined => f.write_str("undefined"),
            Amf0::Date(d) => write!(f, "date({d})"),
            Amf0::Object(p) | Amf0::EcmaArray(p) => {
                f.write_str("{")?;
                for (i, (k, v)) in p.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")
            }
            Amf0::StrictArray(a) => {
                f.write_str("[")?;
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    count: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AmfError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(AmfError::Truncated(self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, AmfError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, AmfError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, AmfError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn f64(&mut self) -> Result<f64, AmfError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(f64::from_be_bytes(a))
    }
    fn string(&mut self, long: bool) -> Result<String, AmfError> {
        let len = if long {
            self.u32()? as usize
        } else {
            self.u16()? as usize
        };
        Ok(String::from_utf8_lossy(self.take(len)?).into_owned())
    }

    fn properties(&mut self, depth: usize) -> Result<Vec<(String, Amf0)>, AmfError> {
        let mut props = Vec::new();
        loop {
            let key = self.string(false)?;
            if key.is_empty() && self.buf.get(self.pos) == Some(&0x09) {
                self.pos += 1;
                return Ok(props);
            }
            let v = self.value(depth + 1)?;
            props.push((key, v));
        }
    }

    fn value(&mut self, depth: usize) -> Result<Amf0, AmfError> {
        if depth > MAX_DEPTH {
            return Err(AmfError::TooDeep(MAX_DEPTH));
        }
        self.count += 1;
        if self.count > MAX_VALUES {
            return Err(AmfError::TooMany(MAX_VALUES));
        }
        let at = self.pos;
        let marker = self.u8()?;
        Ok(match marker {
            0x00 => Amf0::Number(self.f64()?),
            0x01 => Amf0::Boolean(self.u8()? != 0),
            0x02 => Amf0::String(self.string(false)?),
            0x03 => Amf0::Object(self.properties(depth)?),
            0x05 => Amf0::Null,
            0x06 => Amf0::Undefined,
            0x08 => {
                let _approximate_count = self.u32()?;
                Amf0::EcmaArray(self.properties(depth)?)
            }
            0x0a => {
                let n = self.u32()? as usize;
                // Every element takes at least one byte: a count beyond the input is a lie.
                if n > self.buf.len() - self.pos {
                    return Err(AmfError::Truncated(self.pos));
                }
                let mut items = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                Amf0::StrictArray(items)
            }
            0x0b => {
                let ms = self.f64()?;
                let _tz = self.u16()?;
                Amf0::Date(ms)
            }
            0x0c => Amf0::String(self.string(true)?),
            marker => return Err(AmfError::UnsupportedMarker { marker, at }),
        })
    }
}

/// Decodes every value in `buf`.
pub fn decode_all(buf: &[u8]) -> Result<Vec<Amf0>, AmfError> {
    let mut r = Reader {
        buf,
        pos: 0,
        count: 0,
    };
    let mut out = Vec::new();
    while r.pos < buf.len() {
        out.push(r.value(0)?);
    }
    Ok(out)
}

fn put_string_body(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let len = b.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&b[..len]);
}

fn put_properties(out: &mut Vec<u8>, props: &[(String, Amf0)]) {
    for (k, v) in props {
        put_string_body(out, k);
        encode(v, out);
    }
    out.extend_from_slice(&[0, 0, 0x09]);
}

pub fn encode(v: &Amf0, out: &mut Vec<u8>) {
    match v {
        Amf0::Number(n) => {
            out.push(0x00);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Amf0::Boolean(b) => out.extend_from_slice(&[0x01, u8::from(*b)]),
        Amf0::String(s) if s.len() > u16::MAX as usize => {
            out.push(0x0c);
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Amf0::String(s) => {
            out.push(0x02);
            put_string_body(out, s);
        }
        Amf0::Object(p) => {
            out.push(0x03);
            put_properties(out, p);
        }
        Amf0::Null => out.push(0x05),
        Amf0::Undefined => out.push(0x06),
        Amf0::EcmaArray(p) => {
            out.push(0x08);
            out.extend_from_slice(&(p.len() as u32).to_be_bytes());
            put_properties(out, p);
        }
        Amf0::StrictArray(a) => {
            out.push(0x0a);
            out.extend_from_slice(&(a.len() as u32).to_be_bytes());
            for v in a {
                encode(v, out);
            }
        }
        Amf0::Date(d) => {
            out.push(0x0b);
            out.extend_from_slice(&d.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
        }
    }
}

pub fn encode_all(values: &[Amf0]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in values {
        encode(v, &mut out);
    }
    out
}

/// Shorthand for building objects in replies.
pub fn object(props: &[(&str, Amf0)]) -> Amf0 {
    Amf0::Object(
        props
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    )
}

pub fn string(s: &str) -> Amf0 {
    Amf0::String(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let values = vec![
            string("connect"),
            Amf0::Number(1.0),
            object(&[
                ("app", string("live")),
                ("tcUrl", string("rtmp://h/live")),
                ("fpad", Amf0::Boolean(false)),
                ("nested", object(&[("x", Amf0::Null)])),
            ]),
            Amf0::EcmaArray(vec![("width".into(), Amf0::Number(640.0))]),
            Amf0::StrictArray(vec![Amf0::Undefined, Amf0::Date(3.0)]),
        ];
        let bytes = encode_all(&values);
        assert_eq!(decode_all(&bytes).unwrap(), values);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            decode_all(&[0x02, 0x00, 0x05, b'a']),
            Err(AmfError::Truncated(_))
        ));
        assert!(matches!(
            decode_all(&[0x11]),
            Err(AmfError::UnsupportedMarker { marker: 0x11, .. })
        ));
        // A strict array claiming four billion elements.
        assert!(decode_all(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x05]).is_err());
        // Deep nesting.
        let mut deep = Vec::new();
        for _ in 0..100 {
            deep.extend_from_slice(&[0x03, 0x00, 0x01, b'a']);
        }
        assert!(matches!(
            decode_all(&deep),
            Err(AmfError::TooDeep(_)) | Err(AmfError::Truncated(_))
        ));
        assert!(matches!(decode_all(&deep), Err(AmfError::TooDeep(_))));
    }
}
