//! `cargo bench --bench parquet_stream`: a 1 GiB parquet dataset is read record by record in
//! the memory of one row group, the same as a file a tenth its size.
//!
//! Writes two parquet files of `text` records (64 MiB row groups, uncompressed, so the file size
//! is the data size) under `target/bench-data/`, reads each through
//! `qlora::data::record::for_each_record` (the reader `train`, `eval` and `classify` use), and
//! prints the peak resident memory of each read (VmHWM, reset before each read) next to the
//! file size. The baseline is the 100 MiB file, read in the same run: flat memory is a ratio near
//! 1 while the file grows ten times. The files are removed afterwards.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use qlora::data::format::DataFormat;
use qlora::data::record::{for_each_record, Record};

const MIB: u64 = 1 << 20;
const ROW_GROUP: u64 = 64 * MIB;
const RECORD: usize = 2048;

/// Write `size` bytes of text records into a parquet file, one row group at a time.
fn write_dataset(path: &Path, size: u64) -> anyhow::Result<()> {
    let schema = Arc::new(parse_message_type(
        "message schema { REQUIRED BYTE_ARRAY text (UTF8); }",
    )?);
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::UNCOMPRESSED)
            .set_dictionary_enabled(false)
            .build(),
    );
    let mut writer = SerializedFileWriter::new(File::create(path)?, schema, props)?;
    let words = [
        "shall",
        "I",
        "compare",
        "thee",
        "to",
        "a",
        "summer's",
        "day",
        "thou",
        "art",
        "more",
        "lovely",
        "and",
        "temperate",
        "rough",
        "winds",
        "do",
        "shake",
        "the",
        "darling",
        "buds",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut written = 0u64;
    while written < size {
        let mut rows = Vec::new();
        let mut group = 0u64;
        while group < ROW_GROUP && written + group < size {
            let mut text = String::with_capacity(RECORD + 16);
            while text.len() < RECORD {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.push_str(words[(state % words.len() as u64) as usize]);
                text.push(' ');
            }
            group += text.len() as u64;
            rows.push(ByteArray::from(text.into_bytes()));
        }
        let mut rg = writer.next_row_group()?;
        while let Some(mut col) = rg.next_column()? {
            col.typed::<ByteArrayType>()
                .write_batch(&rows, None, None)?;
            col.close()?;
        }
        rg.close()?;
        written += group;
    }
    writer.close()?;
    Ok(())
}

/// Peak resident set of this process in MiB (VmHWM).
fn peak_rss_mib() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/self/status"))?;
    Ok(kb / 1024.0)
}

/// Reset the peak resident set to the current one (Linux `clear_refs` 5).
fn reset_peak() -> anyhow::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")?;
    Ok(())
}

struct Row {
    file_mib: f64,
    records: usize,
    text_mib: f64,
    seconds: f64,
    peak_mib: f64,
}

fn read(path: &Path) -> anyhow::Result<Row> {
    reset_peak()?;
    let t0 = Instant::now();
    let mut text = 0usize;
    let records = for_each_record(path, DataFormat::Auto, |_, r| {
        if let Record::Text(t) = r.record {
            text += t.len();
        }
        Ok(())
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Row {
        file_mib: std::fs::metadata(path)?.len() as f64 / MIB as f64,
        records,
        text_mib: text as f64 / MIB as f64,
        seconds,
        peak_mib: peak_rss_mib()?,
    })
}

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&dir)?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    println!("parquet streaming, {cpu}");
    let mut rows = Vec::new();
    for (name, size) in [("100 MiB", 100 * MIB), ("1 GiB", 1024 * MIB)] {
        let path = dir.join(format!("stream-{}.parquet", size / MIB));
        write_dataset(&path, size)?;
        let row = read(&path);
        std::fs::remove_file(&path)?;
        rows.push((name, row?));
    }
    let base = rows[0].1.peak_mib;
    println!(
        "| file | size (MiB) | records | text read (MiB) | seconds | MiB/s | peak RSS (MiB) | peak vs 100 MiB file |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, r) in &rows {
        println!(
            "| {name} | {:.0} | {} | {:.0} | {:.2} | {:.0} | {:.1} | {:.2}x |",
            r.file_mib,
            r.records,
            r.text_mib,
            r.seconds,
            r.file_mib / r.seconds,
            r.peak_mib,
            r.peak_mib / base
        );
    }
    Ok(())
}
