//! An ONNX file's protobuf read without ONNX Runtime or generated code: walking a message's
//! fields (so the spec can be read and rewritten) and the graph's float weights (so a trained
//! model can be fine-tuned).

use std::collections::BTreeMap;

/// A field's payload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 1 (little-endian bytes).
    Fixed64([u8; 8]),
    /// Wire type 2: a string, bytes, a nested message or a packed repeated field.
    Bytes(&'a [u8]),
    /// Wire type 5 (little-endian bytes).
    Fixed32([u8; 4]),
}

/// One field of a message, with where it lies in the message's bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Field<'a> {
    pub number: u64,
    pub value: Value<'a>,
    /// Byte range of the whole field (tag included) in the message.
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated varint")]
    TruncatedVarint,
    #[error("varint too long")]
    VarintTooLong,
    #[error("field runs past the end")]
    PastTheEnd,
    #[error("unsupported wire type {0}")]
    WireType(u64),
}

impl WireError {
    /// The message as a static string (for errors that keep one).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TruncatedVarint => "truncated varint",
            Self::VarintTooLong => "varint too long",
            Self::PastTheEnd => "field runs past the end",
            Self::WireType(_) => "unsupported wire type",
        }
    }
}

/// The fields of a serialized message, in order; the first malformed field ends the walk with
/// its error.
pub fn fields(msg: &[u8]) -> Fields<'_> {
    Fields {
        msg,
        i: 0,
        failed: false,
    }
}

pub struct Fields<'a> {
    msg: &'a [u8],
    i: usize,
    failed: bool,
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.i >= self.msg.len() {
            return None;
        }
        let r = self.read();
        self.failed = r.is_err();
        Some(r)
    }
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .i
            .checked_add(n)
            .filter(|&e| e <= self.msg.len())
            .ok_or(WireError::PastTheEnd)?;
        let s = &self.msg[self.i..end];
        self.i = end;
        Ok(s)
    }

    fn read(&mut self) -> Result<Field<'a>, WireError> {
        let start = self.i;
        let tag = read_varint(self.msg, &mut self.i)?;
        let value = match tag & 7 {
            0 => Value::Varint(read_varint(self.msg, &mut self.i)?),
            1 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(self.take(8)?);
                Value::Fixed64(b)
            }
            2 => {
                let len = read_varint(self.msg, &mut self.i)?;
                let len = usize::try_from(len).map_err(|_| WireError::PastTheEnd)?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(self.take(4)?);
                Value::Fixed32(b)
            }
            w => return Err(WireError::WireType(w)),
        };
        Ok(Field {
            number: tag >> 3,
            value,
            start,
            end: self.i,
        })
    }
}

pub fn read_varint(b: &[u8], i: &mut usize) -> Result<u64, WireError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i).ok_or(WireError::TruncatedVarint)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(WireError::VarintTooLong)
}

/// Every varint of a packed repeated field.
pub fn packed_varints(b: &[u8]) -> Result<Vec<u64>, WireError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        out.push(read_varint(b, &mut i)?);
    }
    Ok(out)
}

/// A length-delimited field (`field` number, wire type 2) appended to `out`.
pub fn push_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    push_varint(out, (field << 3) | 2);
    push_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

pub fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// ONNX `TensorProto.DataType` of 32-bit floats.
const ONNX_FLOAT: u64 = 1;

/// One weight of a graph: its shape and values.
#[derive(Debug, Clone, PartialEq)]
pub struct Weight {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("weight '{name}' {reason}")]
pub struct WeightError {
    /// The initializer's name (empty before its name field was read).
    pub name: String,
    pub reason: String,
}

/// The float initializers of an ONNX model's graph (ModelProto.graph = 7,
/// GraphProto.initializer = 5), by name; an error names the weight and what is wrong.
pub fn float_initializers(onnx: &[u8]) -> Result<BTreeMap<String, Weight>, WeightError> {
    let wire = |e: WireError| WeightError {
        name: String::new(),
        reason: e.to_string(),
    };
    let mut out = BTreeMap::new();
    for f in fields(onnx) {
        let f = f.map_err(wire)?;
        let (7, Value::Bytes(graph)) = (f.number, f.value) else {
            continue;
        };
        for g in fields(graph) {
            let g = g.map_err(wire)?;
            let (5, Value::Bytes(t)) = (g.number, g.value) else {
                continue;
            };
            let (name, w) = tensor(t)?;
            out.insert(name, w);
        }
    }
    Ok(out)
}

/// One `TensorProto` (dims = 1, data_type = 2, float_data = 4, name = 8, raw_data = 9).
fn tensor(t: &[u8]) -> Result<(String, Weight), WeightError> {
    let mut name = String::new();
    let (mut dims, mut dtype, mut values) = (Vec::new(), 0, Vec::new());
    let mut raw: Option<&[u8]> = None;
    let err = |name: &str, reason: String| WeightError {
        name: name.to_string(),
        reason,
    };
    for f in fields(t) {
        let f = f.map_err(|e| err(&name, e.to_string()))?;
        match (f.number, f.value) {
            (1, Value::Varint(d)) => dims.push(d),
            (1, Value::Bytes(p)) => {
                dims.extend(packed_varints(p).map_err(|e| err(&name, e.to_string()))?)
            }
            (2, Value::Varint(d)) => dtype = d,
            (4, Value::Fixed32(b)) => values.push(f32::from_le_bytes(b)),
            (4, Value::Bytes(p)) => values.extend(le_floats(p)),
            (8, Value::Bytes(n)) => name = String::from_utf8_lossy(n).into_owned(),
            (9, Value::Bytes(r)) => raw = Some(r),
            _ => {}
        }
    }
    if dtype != ONNX_FLOAT {
        return Err(err(&name, format!("has ONNX data type {dtype}, not float")));
    }
    if let Some(r) = raw {
        values = le_floats(r);
    }
    let shape: Vec<usize> = dims
        .iter()
        .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
        .collect();
    let count = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if count != Some(values.len()) {
        return Err(err(
            &name,
            format!("has shape {shape:?} but {} values", values.len()),
        ));
    }
    Ok((name, Weight { shape, values }))
}

/// Little-endian `f32`s (a trailing partial value is ignored).
pub fn le_floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_every_wire_type_and_refuses_truncation() {
        let mut m = Vec::new();
        push_varint(&mut m, 1 << 3);
        push_varint(&mut m, 300);
        push_bytes(&mut m, 2, b"abc");
        m.extend_from_slice(&[(3 << 3) | 5, 1, 2, 3, 4]);
        m.extend_from_slice(&[(4 << 3) | 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        let f: Vec<Field> = fields(&m).collect::<Result<_, _>>().unwrap();
        assert_eq!(f.len(), 4);
        assert_eq!(f[0].value, Value::Varint(300));
        assert_eq!((f[1].number, f[1].value), (2, Value::Bytes(b"abc")));
        assert_eq!(f[2].value, Value::Fixed32([1, 2, 3, 4]));
        assert_eq!(f[3].value, Value::Fixed64([1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!((f[1].start, f[1].end), (3, 8));
        assert_eq!(f[3].end, m.len());
        // A length that runs past the end, a cut varint, an unknown wire type.
        let errs: Vec<_> = [&[0x12u8, 9, 1][..], &[0x08, 0x80][..], &[0x0B][..]]
            .iter()
            .map(|b| fields(b).last().unwrap().unwrap_err())
            .collect();
        assert_eq!(
            errs,
            [
                WireError::PastTheEnd,
                WireError::TruncatedVarint,
                WireError::WireType(3)
            ]
        );
        assert_eq!(packed_varints(&[0xAC, 0x02, 7]).unwrap(), [300, 7]);
    }

    /// A graph with one initializer, written field by field as ONNX does.
    fn model_with(tensor: &[u8]) -> Vec<u8> {
        let mut graph = Vec::new();
        push_bytes(&mut graph, 5, tensor);
        let mut m = Vec::new();
        push_bytes(&mut m, 7, &graph);
        m
    }

    #[test]
    fn float_initializers_by_name_packed_or_raw_and_refusals() {
        let mut raw = Vec::new();
        push_bytes(&mut raw, 1, &[2, 3]); // dims, packed
        push_varint(&mut raw, 2 << 3);
        push_varint(&mut raw, ONNX_FLOAT);
        push_bytes(&mut raw, 8, b"head.weight");
        let values: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        push_bytes(&mut raw, 9, &values);
        let w = float_initializers(&model_with(&raw)).unwrap();
        assert_eq!(w["head.weight"].shape, [2, 3]);
        assert_eq!(w["head.weight"].values, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);

        let mut listed = Vec::new();
        push_varint(&mut listed, 1 << 3); // dims, one by one
        push_varint(&mut listed, 2);
        push_varint(&mut listed, 2 << 3);
        push_varint(&mut listed, ONNX_FLOAT);
        push_bytes(&mut listed, 4, &values[..8]); // float_data, packed
        push_bytes(&mut listed, 8, b"b");
        assert_eq!(
            float_initializers(&model_with(&listed)).unwrap()["b"].values,
            [0.0, 1.0]
        );

        let mut short = raw.clone();
        push_bytes(&mut short, 9, &values[..20]);
        let e = float_initializers(&model_with(&short)).unwrap_err();
        assert_eq!(e.name, "head.weight");
        assert!(e.reason.contains("[2, 3] but 5 values"), "{e}");
        let mut ints = Vec::new();
        push_varint(&mut ints, 2 << 3);
        push_varint(&mut ints, 7); // INT64
        push_bytes(&mut ints, 8, b"shape");
        let e = float_initializers(&model_with(&ints)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "weight 'shape' has ONNX data type 7, not float"
        );
    }
}
