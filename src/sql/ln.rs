//! `ln` is the stages' own (the `libm` crate's, in pure Rust), not the C library's that
//! DataFusion calls: glibc picks its `log` by processor, and a derived column (`bits`)
//! must be the very f64 the stages compute, on every machine.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array};
use arrow::datatypes::DataType;

/// `ln(x)` as the stages compute it (`libm::log`), in place of DataFusion's.
pub(super) fn natural_log() -> datafusion::logical_expr::ScalarUDF {
    use datafusion::logical_expr::{
        ColumnarValue, ScalarUDF, Signature, SimpleScalarUDF, Volatility,
    };
    let fun = Arc::new(|args: &[ColumnarValue]| {
        let arrays = ColumnarValue::values_to_arrays(args)?;
        let x = arrays[0]
            .as_any()
            .downcast_ref::<Float64Array>()
            .expect("the signature coerces to Float64");
        let out: Float64Array = x.unary(libm::log);
        Ok(ColumnarValue::Array(Arc::new(out) as ArrayRef))
    });
    ScalarUDF::from(SimpleScalarUDF::new_with_signature(
        "ln",
        Signature::uniform(1, vec![DataType::Float64], Volatility::Immutable),
        DataType::Float64,
        fun,
    ))
}
