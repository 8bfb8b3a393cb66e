//! A zero-copy MessagePack cursor: reads one value header at a time straight from the body.
//!
//! Strings and binaries are returned as slices of the body, arrays and maps as their element
//! counts (the caller then reads the elements), so decoding allocates nothing. Marker bytes are
//! classified with `rmp::Marker`; the big-endian payloads are read here.

use rmp::Marker;

use super::MsgpackError;

/// A body that is not valid MessagePack. Kept apart from [`MsgpackError`], which is several
/// times larger, so that the hot `read` returns a small `Result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Malformed {
    pub(super) offset: usize,
    pub(super) reason: &'static str,
}

impl From<Malformed> for MsgpackError {
    fn from(malformed: Malformed) -> Self {
        MsgpackError::Malformed {
            offset: malformed.offset,
            reason: malformed.reason,
        }
    }
}

/// One MessagePack value as read by [`Reader::read`]. Integers that fit an `i64` are `Integer`
/// whatever their marker (encoders use unsigned markers for any non-negative number), so
/// `LargeUnsigned` only holds values above `i64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Value<'b> {
    Nil,
    Boolean(bool),
    Integer(i64),
    LargeUnsigned(u64),
    /// float 32 values are widened to f64, which is exact.
    Float(f64),
    /// Raw bytes of a str value; UTF-8 is checked by the caller where the text is used.
    String(&'b [u8]),
    Binary(&'b [u8]),
    /// An array header: this many values follow.
    Array(u32),
    /// A map header: this many key/value pairs follow.
    Map(u32),
    Extension,
}

impl Value<'_> {
    /// The type with its article, for error messages ("an integer").
    pub(super) fn described(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Boolean(_) => "a boolean",
            Value::Integer(_) | Value::LargeUnsigned(_) => "an integer",
            Value::Float(_) => "a float",
            Value::String(_) => "a string",
            Value::Binary(_) => "a binary",
            Value::Array(_) => "an array",
            Value::Map(_) => "a map",
            Value::Extension => "an extension",
        }
    }
}

/// A position in a MessagePack body. Copying a reader remembers a position to come back to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reader<'b> {
    body: &'b [u8],
    position: usize,
}

impl<'b> Reader<'b> {
    pub(super) fn new(body: &'b [u8]) -> Self {
        Reader { body, position: 0 }
    }

    /// The offset of the next byte to read.
    pub(super) fn position(&self) -> usize {
        self.position
    }

    pub(super) fn is_at_end(&self) -> bool {
        self.position == self.body.len()
    }

    /// Reads one value; for an array or a map only its header.
    #[inline]
    pub(super) fn read(&mut self) -> Result<Value<'b>, Malformed> {
        // Fast paths for the most common values in metrics: small integers and short strings.
        if let Some(&byte) = self.body.get(self.position) {
            if byte < 0x80 {
                self.position += 1;
                return Ok(Value::Integer(i64::from(byte)));
            }
            if byte & 0xe0 == 0xa0 {
                let start = self.position;
                self.position += 1;
                return Ok(Value::String(self.take(usize::from(byte & 0x1f), start)?));
            }
        }
        self.read_any()
    }

    fn read_any(&mut self) -> Result<Value<'b>, Malformed> {
        let start = self.position;
        let marker = Marker::from_u8(self.u8(start)?);
        let value = match marker {
            Marker::FixPos(value) => Value::Integer(i64::from(value)),
            Marker::FixNeg(value) => Value::Integer(i64::from(value)),
            Marker::Null => Value::Nil,
            Marker::False => Value::Boolean(false),
            Marker::True => Value::Boolean(true),
            Marker::U8 => Value::Integer(i64::from(self.u8(start)?)),
            Marker::U16 => Value::Integer(i64::from(self.u16(start)?)),
            Marker::U32 => Value::Integer(i64::from(self.u32(start)?)),
            Marker::U64 => {
                let value = self.u64(start)?;
                match i64::try_from(value) {
                    Ok(value) => Value::Integer(value),
                    Err(_) => Value::LargeUnsigned(value),
                }
            }
            Marker::I8 => Value::Integer(i64::from(self.u8(start)? as i8)),
            Marker::I16 => Value::Integer(i64::from(self.u16(start)? as i16)),
            Marker::I32 => Value::Integer(i64::from(self.u32(start)? as i32)),
            Marker::I64 => Value::Integer(self.u64(start)? as i64),
            Marker::F32 => Value::Float(f64::from(f32::from_bits(self.u32(start)?))),
            Marker::F64 => Value::Float(f64::from_bits(self.u64(start)?)),
            Marker::FixStr(length) => Value::String(self.take(usize::from(length), start)?),
            Marker::Str8 => {
                let length = usize::from(self.u8(start)?);
                Value::String(self.take(length, start)?)
            }
            Marker::Str16 => {
                let length = usize::from(self.u16(start)?);
                Value::String(self.take(length, start)?)
            }
            Marker::Str32 => {
                let length = self.u32(start)? as usize;
                Value::String(self.take(length, start)?)
            }
            Marker::Bin8 => {
                let length = usize::from(self.u8(start)?);
                Value::Binary(self.take(length, start)?)
            }
            Marker::Bin16 => {
                let length = usize::from(self.u16(start)?);
                Value::Binary(self.take(length, start)?)
            }
            Marker::Bin32 => {
                let length = self.u32(start)? as usize;
                Value::Binary(self.take(length, start)?)
            }
            Marker::FixArray(count) => self.array(u32::from(count), start)?,
            Marker::Array16 => {
                let count = u32::from(self.u16(start)?);
                self.array(count, start)?
            }
            Marker::Array32 => {
                let count = self.u32(start)?;
                self.array(count, start)?
            }
            Marker::FixMap(count) => self.map(u32::from(count), start)?,
            Marker::Map16 => {
                let count = u32::from(self.u16(start)?);
                self.map(count, start)?
            }
            Marker::Map32 => {
                let count = self.u32(start)?;
                self.map(count, start)?
            }
            // An extension is a type byte and then its data.
            Marker::FixExt1 => self.extension(1, start)?,
            Marker::FixExt2 => self.extension(2, start)?,
            Marker::FixExt4 => self.extension(4, start)?,
            Marker::FixExt8 => self.extension(8, start)?,
            Marker::FixExt16 => self.extension(16, start)?,
            Marker::Ext8 => {
                let length = usize::from(self.u8(start)?);
                self.extension(length, start)?
            }
            Marker::Ext16 => {
                let length = usize::from(self.u16(start)?);
                self.extension(length, start)?
            }
            Marker::Ext32 => {
                let length = self.u32(start)? as usize;
                self.extension(length, start)?
            }
            Marker::Reserved => {
                return Err(Malformed {
                    offset: start,
                    reason: "the byte 0xc1 is not a MessagePack marker",
                })
            }
        };
        Ok(value)
    }

    /// Skips one whole value, including everything inside an array or a map. Iterative, so a
    /// deeply nested body cannot overflow the stack.
    pub(super) fn skip(&mut self) -> Result<(), Malformed> {
        // Bounded by the body length: `array` and `map` refuse counts the body cannot hold.
        let mut pending: u64 = 1;
        while pending > 0 {
            pending -= 1;
            match self.read()? {
                Value::Array(count) => pending += u64::from(count),
                Value::Map(count) => pending += 2 * u64::from(count),
                _ => {}
            }
        }
        Ok(())
    }

    /// An array header. Every element takes at least one byte, so a count larger than the rest
    /// of the body is a lie; refusing it here bounds every loop over elements by the body size.
    fn array(&self, count: u32, start: usize) -> Result<Value<'b>, Malformed> {
        if count as usize > self.body.len() - self.position {
            return Err(Malformed {
                offset: start,
                reason: "an array claims more elements than the body holds",
            });
        }
        Ok(Value::Array(count))
    }

    fn map(&self, count: u32, start: usize) -> Result<Value<'b>, Malformed> {
        if 2 * count as usize > self.body.len() - self.position {
            return Err(Malformed {
                offset: start,
                reason: "a map claims more entries than the body holds",
            });
        }
        Ok(Value::Map(count))
    }

    fn extension(&mut self, length: usize, start: usize) -> Result<Value<'b>, Malformed> {
        self.take(1 + length, start)?;
        Ok(Value::Extension)
    }

    #[inline]
    fn take(&mut self, count: usize, start: usize) -> Result<&'b [u8], Malformed> {
        match self
            .body
            .get(self.position..self.position.saturating_add(count))
        {
            Some(bytes) => {
                self.position += count;
                Ok(bytes)
            }
            None => Err(Malformed {
                offset: start,
                reason: "the body ends inside a value",
            }),
        }
    }

    #[inline]
    fn u8(&mut self, start: usize) -> Result<u8, Malformed> {
        Ok(self.take(1, start)?[0])
    }

    #[inline]
    fn u16(&mut self, start: usize) -> Result<u16, Malformed> {
        let bytes = self.take(2, start)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    #[inline]
    fn u32(&mut self, start: usize) -> Result<u32, Malformed> {
        let bytes = self.take(4, start)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    #[inline]
    fn u64(&mut self, start: usize) -> Result<u64, Malformed> {
        let bytes = self.take(8, start)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(u64::from_be_bytes(array))
    }
}
