//! .npy reading and writing: round trips, f16, streaming chunks, every rejected file, and the
//! atomicity of the writers.

mod common;
use common::{assert_mentions, files_in, uniform_matrix as uniform, write_npy};
use half::f16;
use npyz::Order;
use std::path::{Path, PathBuf};
use vqx::npy::{self, NpyDtype, NpyMatrixReader, NpyStreamWriter};
use vqx::{Error, Matrix};

/// A version 1.0 .npy file with an arbitrary header dict and data bytes.
fn raw_npy(path: &Path, dict: &str, data: &[u8]) {
    let mut header = dict.to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

/// `uniform(rows, cols, seed)` written by vqx as `name` in a fresh directory.
fn written(
    name: &str,
    rows: usize,
    cols: usize,
    seed: u64,
) -> (tempfile::TempDir, PathBuf, Matrix) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    let m = uniform(rows, cols, seed);
    npy::write_matrix(&p, m.as_ref()).unwrap();
    (dir, p, m)
}

#[test]
fn matrix_round_trip() {
    let (_dir, p, m) = written("m.npy", 37, 5, 1);
    let back = npy::read_matrix(&p).unwrap();
    assert_eq!(back, m);
    // npyz agrees on what was written.
    let f = npyz::NpyFile::new(std::fs::File::open(&p).unwrap()).unwrap();
    assert_eq!(f.shape(), &[37, 5]);
    assert_eq!(f.dtype().descr(), "'<f4'");
    assert_eq!(f.into_vec::<f32>().unwrap(), m.data());
}

#[test]
fn indices_and_distances_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let pi = dir.path().join("i.npy");
    let pd = dir.path().join("d.npy");
    let idx = vec![0u32, 7, u32::MAX, 3];
    npy::write_indices(&pi, &idx).unwrap();
    assert_eq!(
        npy::read_indices(&pi).unwrap(),
        vec![0i64, 7, u32::MAX as i64, 3]
    );
    let f = npyz::NpyFile::new(std::fs::File::open(&pi).unwrap()).unwrap();
    assert_eq!(f.dtype().descr(), "'<i8'");
    assert_eq!(f.shape(), &[4]);
    let d = vec![0.5f32, 1e-30, 3.25];
    npy::write_distances(&pd, &d).unwrap();
    assert_eq!(npy::read_vector(&pd).unwrap(), d);
    // An empty vector is a valid file too.
    npy::write_indices(&pi, &[]).unwrap();
    assert!(npy::read_indices(&pi).unwrap().is_empty());
}

#[test]
fn f16_reads_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("h.npy");
    let m = uniform(9, 4, 2);
    let h: Vec<f16> = m.data().iter().map(|&v| f16::from_f32(v)).collect();
    write_npy(&p, &[9, 4], Order::C, &h);
    let r = NpyMatrixReader::open(&p).unwrap();
    assert_eq!(r.dtype(), NpyDtype::F16);
    let back = npy::read_matrix(&p).unwrap();
    assert_eq!(back, Matrix::from_f16(&h, 9, 4).unwrap());
}

#[test]
fn streaming_chunks_cover_every_row_once() {
    let (_dir, p, m) = written("m.npy", 103, 3, 3);
    let mut r = NpyMatrixReader::open(&p).unwrap();
    assert_eq!((r.rows(), r.cols(), r.dtype()), (103, 3, NpyDtype::F32));
    let mut all = Vec::new();
    let mut sizes = Vec::new();
    while let Some(c) = r.next_chunk(10).unwrap() {
        sizes.push(c.rows());
        all.extend_from_slice(c.data());
    }
    assert_eq!(sizes, [10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 3]);
    assert_eq!(all, m.data());
    assert_eq!(r.remaining(), 0);
}

#[test]
fn streaming_writer_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.npy");
    let m = uniform(20, 6, 4);
    let mut w = NpyStreamWriter::matrix(&p, 20, 6).unwrap();
    assert!(!p.exists(), "nothing at the final path before finish");
    for start in (0..20).step_by(7) {
        let end = (start + 7).min(20);
        w.append_rows(m.as_ref().slice_rows(start, end)).unwrap();
    }
    w.finish().unwrap();
    assert_eq!(npy::read_matrix(&p).unwrap(), m);
    // No temporary files left in the directory.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("q.npy")]);
}

#[test]
fn dropped_writer_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.npy");
    {
        let mut w = NpyStreamWriter::indices(&p, 10).unwrap();
        w.append_u32(&[1, 2, 3]).unwrap();
    }
    assert!(!p.exists());
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );
}

#[test]
fn short_writer_fails_and_keeps_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.npy");
    npy::write_distances(&p, &[1.0, 2.0]).unwrap();
    let mut w = NpyStreamWriter::vector(&p, 5).unwrap();
    w.append(&[9.0, 9.0]).unwrap();
    let e = w.finish().unwrap_err();
    assert!(e.to_string().contains("2 values written"), "{e}");
    // The file that was there is untouched, and no temporary is left.
    assert_eq!(npy::read_vector(&p).unwrap(), vec![1.0, 2.0]);
    assert_eq!(files_in(dir.path()), vec!["out.npy".to_string()]);
}

#[test]
fn overlong_append_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.npy");
    let mut w = NpyStreamWriter::vector(&p, 2).unwrap();
    let e = w.append(&[1.0, 2.0, 3.0]).unwrap_err();
    assert!(e.to_string().contains("exceed"), "{e}");
    drop(w);
    assert!(files_in(dir.path()).is_empty());
}

#[test]
fn writer_into_missing_directory_is_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("no/such/dir/out.npy");
    let e = npy::write_indices(&p, &[1]).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("out.npy"), "{e}");
}

#[test]
fn missing_file_is_io_error_naming_path() {
    let e = npy::read_matrix("/nonexistent/dir/x.npy").unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/dir/x.npy"), "{e}");
}

/// Writes `name` with `write` and fails unless `read_matrix` refuses it with an `Error::Npy`
/// that mentions every needle.
fn rejected(name: &str, write: impl FnOnce(&Path), needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    write(&p);
    let msg = match npy::read_matrix(&p).unwrap_err() {
        e @ Error::Npy { .. } => e.to_string(),
        other => panic!("expected Error::Npy, got {other:?}"),
    };
    assert_mentions(&msg, needles);
}

#[test]
fn f64_is_rejected_with_advice() {
    let f64s = |p: &Path| write_npy(p, &[2, 2], Order::C, &[1.0f64, 2.0, 3.0, 4.0]);
    rejected("d.npy", f64s, &["d.npy", "float64", "astype(np.float32)"]);
}

#[test]
fn integers_are_rejected() {
    let ints = |p: &Path| write_npy(p, &[2, 2], Order::C, &[1i64, 2, 3, 4]);
    rejected("i.npy", ints, &["int64"]);
}

#[test]
fn fortran_order_is_rejected() {
    let fortran = |p: &Path| write_npy(p, &[2, 3], Order::Fortran, &[1f32; 6]);
    rejected("f.npy", fortran, &["Fortran"]);
}

#[test]
fn wrong_rank_is_rejected() {
    let three = |p: &Path| write_npy(p, &[2, 3, 4], Order::C, &[0f32; 24]);
    rejected("r.npy", three, &["3 dimensions", "(2, 3, 4)"]);
    let one = |p: &Path| write_npy(p, &[5], Order::C, &[0f32; 5]);
    rejected("r.npy", one, &["1 dimension ", "(5,)"]);
}

#[test]
fn big_endian_is_rejected() {
    let dict = "{'descr': '>f4', 'fortran_order': False, 'shape': (1, 2), }";
    rejected("be.npy", |p| raw_npy(p, dict, &[0u8; 8]), &["big-endian"]);
}

#[test]
fn bf16_raw_void_is_explained() {
    let dict = "{'descr': '|V2', 'fortran_order': False, 'shape': (1, 2), }";
    rejected("bf.npy", |p| raw_npy(p, dict, &[0u8; 4]), &["bfloat16"]);
}

#[test]
fn truncated_data_is_rejected() {
    let truncated = |p: &Path| {
        npy::write_matrix(p, uniform(10, 4, 5).as_ref()).unwrap();
        let len = std::fs::metadata(p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_len(len - 6).unwrap();
    };
    rejected("t.npy", truncated, &["truncated", "160 bytes"]);
}

#[test]
fn truncated_header_and_garbage_are_rejected() {
    let bytes = |b: &'static [u8]| move |p: &Path| std::fs::write(p, b).unwrap();
    rejected(
        "h.npy",
        bytes(b"\x93NUMPY\x01\x00\x76\x00{'descr'"),
        &["h.npy"],
    );
    let garbage = bytes(b"hello, this is not an npy file at all");
    rejected("h.npy", garbage, &["not a valid .npy"]);
    rejected("h.npy", bytes(b""), &["empty file"]);
}

#[test]
fn empty_matrix_reads_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.npy");
    write_npy::<f32>(&p, &[0, 8], Order::C, &[]);
    let m = npy::read_matrix(&p).unwrap();
    assert_eq!((m.rows(), m.cols()), (0, 8));
}

/// A float32 file maps in place with the values `read_matrix` returns (odd shapes, one row,
/// many); a float16 file does not map (it is converted on read); a bad file is an error.
#[test]
fn mapped_matrix_equals_the_read_matrix() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (n, d)) in [(1, 1), (7, 3), (1000, 17)].into_iter().enumerate() {
        let p = dir.path().join(format!("m{i}.npy"));
        let m = uniform(n, d, i as u64 + 3);
        npy::write_matrix(&p, m.as_ref()).unwrap();
        let mapped = npy::MappedMatrix::open(&p).unwrap().expect("float32 maps");
        let read = npy::read_matrix(&p).unwrap();
        assert_eq!(mapped.as_ref().to_owned(), read, "{n}×{d}");
    }
    let p = dir.path().join("h.npy");
    let h: Vec<f16> = (0..8).map(|v| f16::from_f32(v as f32)).collect();
    write_npy(&p, &[4, 2], Order::C, &h);
    assert!(
        npy::MappedMatrix::open(&p).unwrap().is_none(),
        "float16 mapped"
    );
    let bad = dir.path().join("bad.npy");
    std::fs::write(&bad, b"not npy").unwrap();
    assert!(npy::MappedMatrix::open(&bad).is_err());
}
