//! A declared table's columns: name, type, nullability, and whether a column is stored
//! or derived in SQL; and the Arrow schema they make.

use std::fmt;

use arrow::datatypes::DataType;

/// A declared column: name, type, whether it may be null, and whether it is stored.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColumnType,
    pub nullable: bool,
    /// A column the file does not hold: SQL computes it from the stored columns with
    /// this expression (see [`Column::derived`]).
    pub derived: Option<&'static str>,
}

impl Column {
    pub const fn new(name: &'static str, ty: ColumnType) -> Column {
        Column {
            name,
            ty,
            nullable: false,
            derived: None,
        }
    }

    pub const fn nullable(name: &'static str, ty: ColumnType) -> Column {
        Column {
            name,
            ty,
            nullable: true,
            derived: None,
        }
    }

    /// A column that is a pure function of the row's stored columns (a probability's
    /// bits, a ratio of two counts). Writing it would cost every build its bytes (half a
    /// gigabyte per f64 column at the record's scale) and every reader their decoding,
    /// for nothing: `cachemoney sql` shows the table as a view that computes it with
    /// `sql`, at its declared place, so queries cannot tell the difference. `sql` must
    /// give the very bits the stage would have written (tests check it); stages never
    /// read a derived column from a file (a [`Read`] of one is refused).
    pub const fn derived(name: &'static str, ty: ColumnType, sql: &'static str) -> Column {
        Column {
            name,
            ty,
            nullable: false,
            derived: Some(sql),
        }
    }

    pub fn is_stored(&self) -> bool {
        self.derived.is_none()
    }
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&column_text(self.name, self.ty.name(), self.nullable))?;
        if self.derived.is_some() {
            f.write_str(" (derived)")?;
        }
        Ok(())
    }
}

pub(super) fn column_text(name: &str, ty: &str, nullable: bool) -> String {
    format!("{name} {ty}{}", if nullable { "?" } else { "" })
}

/// The column types cachemoney's tables use, named the way Rust names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I64,
    F32,
    F64,
    Utf8,
}

impl ColumnType {
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Bool => "bool",
            ColumnType::U8 => "u8",
            ColumnType::U16 => "u16",
            ColumnType::U32 => "u32",
            ColumnType::U64 => "u64",
            ColumnType::I64 => "i64",
            ColumnType::F32 => "f32",
            ColumnType::F64 => "f64",
            ColumnType::Utf8 => "utf8",
        }
    }

    pub fn arrow(self) -> DataType {
        match self {
            ColumnType::Bool => DataType::Boolean,
            ColumnType::U8 => DataType::UInt8,
            ColumnType::U16 => DataType::UInt16,
            ColumnType::U32 => DataType::UInt32,
            ColumnType::U64 => DataType::UInt64,
            ColumnType::I64 => DataType::Int64,
            ColumnType::F32 => DataType::Float32,
            ColumnType::F64 => DataType::Float64,
            ColumnType::Utf8 => DataType::Utf8,
        }
    }

    pub const ALL: [ColumnType; 9] = [
        ColumnType::Bool,
        ColumnType::U8,
        ColumnType::U16,
        ColumnType::U32,
        ColumnType::U64,
        ColumnType::I64,
        ColumnType::F32,
        ColumnType::F64,
        ColumnType::Utf8,
    ];

    /// The type a declaration names (`u16`, `f64`), if any.
    pub fn from_name(name: &str) -> Option<ColumnType> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The name of an Arrow type as a declaration would write it (its Arrow name when no
    /// declared type matches).
    pub fn name_of(data_type: &DataType) -> String {
        Self::ALL
            .iter()
            .find(|t| &t.arrow() == data_type)
            .map(|t| t.name().to_string())
            .unwrap_or_else(|| data_type.to_string())
    }
}

/// The Arrow schema of a declared table as its file holds it (derived columns left
/// out), for writers that build theirs from the declaration.
pub fn arrow_schema(columns: &[Column]) -> std::sync::Arc<arrow::datatypes::Schema> {
    std::sync::Arc::new(arrow::datatypes::Schema::new(
        columns
            .iter()
            .filter(|c| c.is_stored())
            .map(|c| arrow::datatypes::Field::new(c.name, c.ty.arrow(), c.nullable))
            .collect::<Vec<_>>(),
    ))
}
