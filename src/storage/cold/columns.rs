//! The Parquet layout of spilled telemetry: one row per point, sorted by (orb, ts, suffix).
//!
//! | column        | type                       | from                               |
//! |---------------|----------------------------|------------------------------------|
//! | `orb_id`      | utf8                       | the orb (the tenant is the path)   |
//! | `ts`          | timestamp(ms, UTC)         | device time                        |
//! | `suffix`      | uint64                     | the key suffix (orders equal `ts`) |
//! | `received_at` | timestamp(ms, UTC)         | server receive time                |
//! | `msg_id`      | utf8, nullable             |                                    |
//! | `battery`, `lat`, `lon`, `speed` | float64, nullable |                           |
//! | `mode`        | utf8, nullable             |                                    |
//! | `metrics`     | map<utf8, float64>         | every other numeric field          |
//!
//! Typed columns for the standard fields let any reader (pyarrow, DuckDB, Spark) filter and
//! aggregate without decoding JSON; the map keeps arbitrary metric names without a schema per
//! tenant. zstd, statistics per row group (orb and time pruning), row groups of
//! [`ROW_GROUP_ROWS`] rows.

use std::sync::Arc;

use arrow_array::builder::{Float64Builder, MapBuilder, StringBuilder, TimestampMillisecondBuilder, UInt64Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, TimestampMillisecondType, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::model::telemetry::MetricSet;
use crate::model::{OrbId, TelemetryPoint};
use crate::storage::StoredPoint;

/// Rows per row group: one orb's hour at 2 s is 1,800 rows, so a group holds ~18 orbs' hour.
pub const ROW_GROUP_ROWS: usize = 32 * 1024;

/// Column indexes, in schema order.
pub const COL_ORB: usize = 0;
pub const COL_TS: usize = 1;

/// One spilled point.
#[derive(Clone, Debug, PartialEq)]
pub struct ColdRow {
    pub orb: OrbId,
    pub suffix: u64,
    pub point: StoredPoint,
}

impl ColdRow {
    pub fn cursor(&self) -> (u64, u64) {
        (self.point.point.ts, self.suffix)
    }
}

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn metrics_field() -> Field {
    let entries =
        Fields::from(vec![Field::new("keys", DataType::Utf8, false), Field::new("values", DataType::Float64, true)]);
    Field::new(
        "metrics",
        DataType::Map(Arc::new(Field::new("entries", DataType::Struct(entries), false)), false),
        false,
    )
}

/// The schema of every spilled file.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("orb_id", DataType::Utf8, false),
        Field::new("ts", ts_type(), false),
        Field::new("suffix", DataType::UInt64, false),
        Field::new("received_at", ts_type(), false),
        Field::new("msg_id", DataType::Utf8, true),
        Field::new("battery", DataType::Float64, true),
        Field::new("lat", DataType::Float64, true),
        Field::new("lon", DataType::Float64, true),
        Field::new("speed", DataType::Float64, true),
        Field::new("mode", DataType::Utf8, true),
        metrics_field(),
    ]))
}

/// The writer settings of every spilled file.
pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_sorting_columns(Some(vec![
            SortingColumn { column_idx: COL_ORB as i32, descending: false, nulls_first: false },
            SortingColumn { column_idx: COL_TS as i32, descending: false, nulls_first: false },
        ]))
        .set_created_by(format!("orbmanager {}", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Converts rows (already sorted) into one record batch.
pub fn to_batch(rows: &[ColdRow]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = rows.len();
    let mut orb = StringBuilder::with_capacity(n, n * 16);
    let mut ts = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut suffix = UInt64Builder::with_capacity(n);
    let mut received = TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut msg_id = StringBuilder::new();
    let (mut battery, mut lat, mut lon, mut speed) = (
        Float64Builder::with_capacity(n),
        Float64Builder::with_capacity(n),
        Float64Builder::with_capacity(n),
        Float64Builder::with_capacity(n),
    );
    let mut mode = StringBuilder::new();
    let mut metrics = MapBuilder::new(None, StringBuilder::new(), Float64Builder::new())
        .with_keys_field(Arc::new(Field::new("keys", DataType::Utf8, false)))
        .with_values_field(Arc::new(Field::new("values", DataType::Float64, true)));
    for r in rows {
        let p = &r.point.point;
        orb.append_value(r.orb.as_str());
        ts.append_value(p.ts as i64);
        suffix.append_value(r.suffix);
        received.append_value(r.point.received_ms as i64);
        msg_id.append_option(p.msg_id.as_deref());
        battery.append_option(p.battery);
        lat.append_option(p.position.map(|(la, _)| la));
        lon.append_option(p.position.map(|(_, lo)| lo));
        speed.append_option(p.speed);
        mode.append_option(p.mode.as_deref());
        for (name, value) in p.metrics.iter() {
            metrics.keys().append_value(name);
            metrics.values().append_value(value);
        }
        metrics.append(true)?;
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(orb.finish()),
        Arc::new(ts.finish()),
        Arc::new(suffix.finish()),
        Arc::new(received.finish()),
        Arc::new(msg_id.finish()),
        Arc::new(battery.finish()),
        Arc::new(lat.finish()),
        Arc::new(lon.finish()),
        Arc::new(speed.finish()),
        Arc::new(mode.finish()),
        Arc::new(metrics.finish()),
    ];
    RecordBatch::try_new(schema(), columns)
}

/// Encodes sorted rows as one Parquet file.
pub fn encode(rows: &[ColdRow]) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let mut out = Vec::with_capacity(rows.len() * 64 + 4096);
    let mut w = ArrowWriter::try_new(&mut out, schema(), Some(writer_properties()))?;
    for chunk in rows.chunks(ROW_GROUP_ROWS) {
        let batch = to_batch(chunk).map_err(|e| parquet::errors::ParquetError::General(e.to_string()))?;
        w.write(&batch)?;
    }
    w.close()?;
    Ok(out)
}

/// Why a record batch could not be read back as rows.
#[derive(Debug, thiserror::Error)]
#[error("spilled file column `{column}`: {detail}")]
pub struct ShapeError {
    pub column: &'static str,
    pub detail: String,
}

fn column<'a>(b: &'a RecordBatch, name: &'static str) -> Result<&'a ArrayRef, ShapeError> {
    b.column_by_name(name).ok_or(ShapeError { column: name, detail: "missing".into() })
}

fn opt_f64(a: &arrow_array::PrimitiveArray<Float64Type>, i: usize) -> Option<f64> {
    if a.is_null(i) { None } else { Some(a.value(i)) }
}

/// Reads rows back from a batch of this schema, keeping those `keep` accepts (it sees the orb
/// id and `ts` before anything else is decoded).
pub fn from_batch(
    b: &RecordBatch,
    mut keep: impl FnMut(&str, u64) -> bool,
    out: &mut Vec<ColdRow>,
) -> Result<(), ShapeError> {
    let bad = |column: &'static str| move |_| ShapeError { column, detail: "unexpected type".into() };
    let orb = column(b, "orb_id")?.as_string_opt::<i32>().ok_or(()).map_err(bad("orb_id"))?;
    let ts = column(b, "ts")?.as_primitive_opt::<TimestampMillisecondType>().ok_or(()).map_err(bad("ts"))?;
    let suffix = column(b, "suffix")?.as_primitive_opt::<UInt64Type>().ok_or(()).map_err(bad("suffix"))?;
    let received = column(b, "received_at")?
        .as_primitive_opt::<TimestampMillisecondType>()
        .ok_or(())
        .map_err(bad("received_at"))?;
    let msg_id = column(b, "msg_id")?.as_string_opt::<i32>().ok_or(()).map_err(bad("msg_id"))?;
    let f = |name: &'static str| -> Result<&arrow_array::PrimitiveArray<Float64Type>, ShapeError> {
        column(b, name)?.as_primitive_opt::<Float64Type>().ok_or(()).map_err(bad(name))
    };
    let (battery, lat, lon, speed) = (f("battery")?, f("lat")?, f("lon")?, f("speed")?);
    let mode = column(b, "mode")?.as_string_opt::<i32>().ok_or(()).map_err(bad("mode"))?;
    let metrics = column(b, "metrics")?.as_map_opt().ok_or(()).map_err(bad("metrics"))?;
    let mkeys = metrics.keys().as_string_opt::<i32>().ok_or(()).map_err(bad("metrics"))?;
    let mvalues = metrics.values().as_primitive_opt::<Float64Type>().ok_or(()).map_err(bad("metrics"))?;
    let offsets = metrics.value_offsets();
    for i in 0..b.num_rows() {
        let (o, t) = (orb.value(i), ts.value(i));
        if t < 0 || !keep(o, t as u64) {
            continue;
        }
        let orb_id = OrbId::parse(o).map_err(|e| ShapeError { column: "orb_id", detail: e.to_string() })?;
        let (s, e) = (offsets[i] as usize, offsets[i + 1] as usize);
        let position = match (opt_f64(lat, i), opt_f64(lon, i)) {
            (Some(la), Some(lo)) => Some((la, lo)),
            _ => None,
        };
        let point = TelemetryPoint {
            ts: t as u64,
            msg_id: (!msg_id.is_null(i)).then(|| msg_id.value(i).to_string()),
            battery: opt_f64(battery, i),
            position,
            speed: opt_f64(speed, i),
            mode: (!mode.is_null(i)).then(|| mode.value(i).to_string()),
            metrics: MetricSet::from_pairs((s..e).map(|j| (mkeys.value(j), mvalues.value(j))))
                .map_err(|name| ShapeError { column: "metrics", detail: format!("metric {name:?} appears twice") })?,
        };
        out.push(ColdRow {
            orb: orb_id,
            suffix: suffix.value(i),
            point: StoredPoint { point, received_ms: received.value(i).max(0) as u64 },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn row(orb: &str, ts: u64, metrics: Vec<(String, f64)>) -> ColdRow {
        ColdRow {
            orb: OrbId::parse(orb).unwrap(),
            suffix: ts ^ 0xabc,
            point: StoredPoint {
                point: TelemetryPoint {
                    ts,
                    msg_id: ts.is_multiple_of(2).then(|| format!("m{ts}")),
                    battery: Some(50.5),
                    position: (!ts.is_multiple_of(3)).then_some((37.7, -122.4)),
                    speed: None,
                    mode: Some("mission".into()),
                    metrics: MetricSet::from_pairs(metrics).unwrap(),
                },
                received_ms: ts + 5,
            },
        }
    }

    #[test]
    fn rows_round_trip_through_parquet() {
        let rows: Vec<ColdRow> = (0..100u64)
            .map(|i| row(if i < 50 { "a" } else { "b" }, 1_700_000_000_000 + i, vec![("temp".into(), i as f64)]))
            .chain([row("c", 1_700_000_000_500, vec![])])
            .collect();
        let bytes = encode(&rows).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap().build().unwrap();
        let mut back = Vec::new();
        for b in reader {
            from_batch(&b.unwrap(), |_, _| true, &mut back).unwrap();
        }
        assert_eq!(back, rows);
        let mut only_b = Vec::new();
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(encode(&rows).unwrap()))
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            from_batch(&b.unwrap(), |o, t| o == "b" && t % 10 == 0, &mut only_b).unwrap();
        }
        assert_eq!(only_b.len(), 5);
        assert!(only_b.iter().all(|r| r.orb.as_str() == "b"));
    }
}
