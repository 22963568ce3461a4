//! Element types the codecs know. The code is stored in every frame header, so values are fixed.

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    /// Opaque bytes (skeletons, unknown files, quantized blocks).
    Bytes = 0,
    Bool = 1,
    U8 = 2,
    I8 = 3,
    F8E4M3 = 4,
    F8E5M2 = 5,
    I16 = 6,
    U16 = 7,
    F16 = 8,
    BF16 = 9,
    I32 = 10,
    U32 = 11,
    F32 = 12,
    I64 = 13,
    U64 = 14,
    F64 = 15,
}

impl DType {
    pub const ALL: [DType; 16] = [
        DType::Bytes,
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::I16,
        DType::U16,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::U32,
        DType::F32,
        DType::I64,
        DType::U64,
        DType::F64,
    ];

    pub fn from_code(code: u8) -> Result<Self> {
        Self::ALL
            .get(code as usize)
            .copied()
            .ok_or_else(|| Error::InvalidArgument(format!("unknown dtype code {code}")))
    }

    /// Name as safetensors spells it ("BYTES" for opaque data).
    pub fn name(self) -> &'static str {
        match self {
            DType::Bytes => "BYTES",
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F64 => "F64",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|d| d.name() == name)
    }

    /// Bytes per element (1 for opaque bytes).
    pub fn size(self) -> usize {
        match self {
            DType::Bytes | DType::Bool | DType::U8 | DType::I8 | DType::F8E4M3 | DType::F8E5M2 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// Multi-byte IEEE floats get their bit pattern rotated left by one before the byte split, so
    /// that the exponent lands in the top byte plane and the sign joins the low mantissa bits.
    pub fn rotates(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }
}
