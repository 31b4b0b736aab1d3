//! AMQP field tables, and the bounds-checked [`Reader`] every decoder here uses.
//!
//! We encode the few value types we send (long strings 'S', booleans 't', 32-bit integers 'I',
//! 64-bit integers 'l', timestamps 'T', nested tables 'F'); we decode every type RabbitMQ
//! sends, so that a table can be read (or skipped) whole. Nesting is bounded.

use bytes::{BufMut, BytesMut};

use super::{WireError, MAX_SHORT_STRING_LENGTH};

/// How deep nested tables and arrays are followed when decoding.
const MAX_DEPTH: usize = 16;

/// A value we put into a field table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// 'S': bytes with a 32-bit length.
    LongString(&'a [u8]),
    /// 't': a boolean octet.
    Bool(bool),
    /// 'I': a signed 32-bit integer (what RabbitMQ and lapin call LongInt).
    I32(i32),
    /// 'l': a signed 64-bit integer (no header uses it yet).
    #[allow(dead_code)]
    I64(i64),
    /// 'T': seconds since the epoch (no header uses it yet).
    #[allow(dead_code)]
    Timestamp(u64),
    /// 'F': a nested table.
    Table(&'a [(&'a str, Value<'a>)]),
}

/// A decoded field value (owned; decoding is for the rare tables we read, and for tests).
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// 't'
    Bool(bool),
    /// Any integer type, widened.
    Int(i64),
    /// 'i' and 'T' (unsigned 32/64 bit).
    UInt(u64),
    /// 'f' / 'd'
    Float(f64),
    /// 'D': scale and value.
    Decimal(u8, u32),
    /// 'S' / 'x'
    Bytes(Vec<u8>),
    /// 'A'
    Array(Vec<Decoded>),
    /// 'F'
    Table(Vec<(String, Decoded)>),
    /// 'V'
    Void,
}

/// Appends a short string (length octet + bytes); `what` names it in the error.
pub fn put_short(out: &mut BytesMut, s: &[u8], what: &'static str) -> Result<(), WireError> {
    if s.len() > MAX_SHORT_STRING_LENGTH {
        return Err(WireError::ShortStringTooLong(what));
    }
    out.put_u8(s.len() as u8);
    out.extend_from_slice(s);
    Ok(())
}

/// Appends a long string (32-bit length + bytes).
pub fn put_long(out: &mut BytesMut, s: &[u8], what: &'static str) -> Result<(), WireError> {
    let len = u32::try_from(s.len()).map_err(|_| WireError::TooLong(what))?;
    out.put_u32(len);
    out.extend_from_slice(s);
    Ok(())
}

/// Appends a field table. On error `out` may hold part of it: callers check names first or
/// truncate back (see `methods::publish`).
pub fn put_table(out: &mut BytesMut, entries: &[(&str, Value<'_>)]) -> Result<(), WireError> {
    let start = out.len();
    out.put_u32(0);
    for (name, value) in entries {
        put_short(out, name.as_bytes(), "field name")?;
        match *value {
            Value::LongString(s) => {
                out.put_u8(b'S');
                put_long(out, s, "header value")?;
            }
            Value::Bool(b) => {
                out.put_u8(b't');
                out.put_u8(u8::from(b));
            }
            Value::I32(n) => {
                out.put_u8(b'I');
                out.put_i32(n);
            }
            Value::I64(n) => {
                out.put_u8(b'l');
                out.put_i64(n);
            }
            Value::Timestamp(t) => {
                out.put_u8(b'T');
                out.put_u64(t);
            }
            Value::Table(inner) => {
                out.put_u8(b'F');
                put_table(out, inner)?;
            }
        }
    }
    let len = u32::try_from(out.len() - start - 4).map_err(|_| WireError::TooLong("table"))?;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// A cursor over untrusted bytes: every read checks the length first.
pub struct Reader<'a> {
    /// What is left.
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next `N` bytes as an array.
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N, what)?);
        Ok(a)
    }

    /// An octet.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A big-endian u16.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    /// A big-endian u32.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// A big-endian u64.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A short string's bytes.
    pub fn short(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.u8(what)?;
        self.bytes(usize::from(n), what)
    }

    /// A long string's bytes.
    pub fn long(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let n = self.u32(what)?;
        self.bytes(n as usize, what)
    }

    /// Decodes a field table (length prefix included).
    pub fn table(&mut self) -> Result<Vec<(String, Decoded)>, WireError> {
        decode_entries(self.long("field table")?)
    }
}

/// Decodes the entries of a table whose bytes (after the length prefix) are `buf`.
pub fn decode_entries(buf: &[u8]) -> Result<Vec<(String, Decoded)>, WireError> {
    decode_table(buf, 0)
}

/// Decodes the entries of a table whose bytes are `buf`, `depth` levels down.
fn decode_table(buf: &[u8], depth: usize) -> Result<Vec<(String, Decoded)>, WireError> {
    if depth > MAX_DEPTH {
        return Err(WireError::TooDeep);
    }
    let mut r = Reader::new(buf);
    let mut entries = Vec::new();
    while !r.buf.is_empty() {
        let name = String::from_utf8_lossy(r.short("field name")?).into_owned();
        let value = decode_value(&mut r, depth)?;
        entries.push((name, value));
    }
    Ok(entries)
}

/// Decodes one typed field value.
fn decode_value(r: &mut Reader<'_>, depth: usize) -> Result<Decoded, WireError> {
    const W: &str = "field value";
    Ok(match r.u8(W)? {
        b't' => Decoded::Bool(r.u8(W)? != 0),
        b'b' => Decoded::Int(i64::from(r.u8(W)? as i8)),
        b'B' => Decoded::Int(i64::from(r.u8(W)?)),
        b's' => Decoded::Int(i64::from(r.u16(W)? as i16)),
        b'u' => Decoded::Int(i64::from(r.u16(W)?)),
        b'I' => Decoded::Int(i64::from(r.u32(W)? as i32)),
        b'i' => Decoded::UInt(u64::from(r.u32(W)?)),
        b'l' => Decoded::Int(r.u64(W)? as i64),
        b'T' => Decoded::UInt(r.u64(W)?),
        b'f' => Decoded::Float(f64::from(f32::from_bits(r.u32(W)?))),
        b'd' => Decoded::Float(f64::from_bits(r.u64(W)?)),
        b'D' => Decoded::Decimal(r.u8(W)?, r.u32(W)?),
        b'S' | b'x' => Decoded::Bytes(r.long(W)?.to_vec()),
        b'F' => Decoded::Table(decode_table(r.long(W)?, depth + 1)?),
        b'A' => {
            if depth >= MAX_DEPTH {
                return Err(WireError::TooDeep);
            }
            let mut items = Reader::new(r.long(W)?);
            let mut out = Vec::new();
            while !items.buf.is_empty() {
                out.push(decode_value(&mut items, depth + 1)?);
            }
            Decoded::Array(out)
        }
        b'V' => Decoded::Void,
        other => return Err(WireError::BadFieldType(other)),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn headers_round_trip_with_their_types() {
        let inner = [("publisher_confirms", Value::Bool(true))];
        let entries = [
            ("x-mqtt-topic", Value::LongString(b"a/b")),
            ("x-mqtt-qos", Value::I32(1)),
            ("x-mqtt-retain", Value::Bool(false)),
            ("big", Value::I64(-5)),
            ("at", Value::Timestamp(1_700_000_000)),
            ("capabilities", Value::Table(&inner)),
        ];
        let mut out = BytesMut::new();
        put_table(&mut out, &entries).expect("encodes");
        // 'I' is the type RabbitMQ (and lapin's LongInt) use for a signed 32-bit integer.
        assert!(out.windows(6).any(|w| w == b"qos\x49\x00\x00"));
        let decoded = Reader::new(&out).table().expect("decodes");
        assert_eq!(
            decoded,
            vec![
                ("x-mqtt-topic".to_owned(), Decoded::Bytes(b"a/b".to_vec())),
                ("x-mqtt-qos".to_owned(), Decoded::Int(1)),
                ("x-mqtt-retain".to_owned(), Decoded::Bool(false)),
                ("big".to_owned(), Decoded::Int(-5)),
                ("at".to_owned(), Decoded::UInt(1_700_000_000)),
                (
                    "capabilities".to_owned(),
                    Decoded::Table(vec![("publisher_confirms".to_owned(), Decoded::Bool(true))])
                ),
            ]
        );
    }

    #[test]
    fn an_overlong_field_name_is_an_error_not_a_panic() {
        let name = "n".repeat(256);
        let mut out = BytesMut::new();
        assert_eq!(
            put_table(&mut out, &[(name.as_str(), Value::Bool(true))]),
            Err(WireError::ShortStringTooLong("field name"))
        );
    }

    #[test]
    fn deep_nesting_is_refused() {
        // 'F' tables nested far deeper than MAX_DEPTH, built from the inside out.
        let mut inner: Vec<u8> = Vec::new();
        for _ in 0..100 {
            let mut t = vec![1, b'k', b'F'];
            t.extend_from_slice(&(inner.len() as u32).to_be_bytes());
            t.extend_from_slice(&inner);
            inner = t;
        }
        let mut buf = (inner.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(&inner);
        assert_eq!(Reader::new(&buf).table(), Err(WireError::TooDeep));
    }

    proptest! {
        #[test]
        fn decoding_garbage_tables_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Reader::new(&bytes).table();
            let mut len = (bytes.len() as u32).to_be_bytes().to_vec();
            len.extend_from_slice(&bytes);
            let _ = Reader::new(&len).table();
        }

        #[test]
        fn string_headers_round_trip(topic in ".{0,300}", n in any::<i32>(), b in any::<bool>()) {
            let entries = [("t", Value::LongString(topic.as_bytes())), ("n", Value::I32(n)),
                           ("b", Value::Bool(b))];
            let mut out = BytesMut::new();
            put_table(&mut out, &entries).expect("encodes");
            let decoded = Reader::new(&out).table().expect("decodes");
            prop_assert_eq!(decoded, vec![
                ("t".to_owned(), Decoded::Bytes(topic.into_bytes())),
                ("n".to_owned(), Decoded::Int(i64::from(n))),
                ("b".to_owned(), Decoded::Bool(b)),
            ]);
        }
    }
}
