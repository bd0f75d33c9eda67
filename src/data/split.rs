//! The held-out validation split: a seeded, document-level choice made before packing, so no
//! document (nor a window of one) is in both sets.

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::error::DataError;
use super::example::Example;

/// Distinguishes the split's random stream from the epoch shuffles drawn from the same seed.
const SPLIT_STREAM: u64 = 0x7661_6c5f_7370_6c74; // "val_splt"

/// Split `examples` into (train, validation) with about `fraction` of the documents held out,
/// chosen by `seed`. Both keep file order. With `fraction == 0` the validation set is empty;
/// otherwise each side gets at least one document.
pub fn split_validation(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>), DataError> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(DataError::Options(format!(
            "the validation fraction must be in [0, 1), not {fraction}"
        )));
    }
    if fraction == 0.0 {
        return Ok((examples, Vec::new()));
    }
    let docs: Vec<usize> = examples
        .iter()
        .map(|e| e.doc)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if docs.len() < 2 {
        return Err(DataError::Options(format!(
            "a validation split needs at least 2 documents, and the dataset has {}; give a \
             separate validation file instead",
            docs.len()
        )));
    }
    let n_val = ((docs.len() as f64 * fraction).round() as usize).clamp(1, docs.len() - 1);
    let mut shuffled = docs;
    shuffled.shuffle(&mut StdRng::seed_from_u64(seed ^ SPLIT_STREAM));
    let held: BTreeSet<usize> = shuffled[..n_val].iter().copied().collect();
    Ok(examples.into_iter().partition(|e| !held.contains(&e.doc)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(n: usize, windows: usize) -> Vec<Example> {
        (0..n)
            .flat_map(|d| {
                (0..windows).map(move |w| Example {
                    ids: vec![d as u32, w as u32],
                    labels: vec![d as i64, w as i64],
                    doc: d,
                    line: d + 1,
                    target: None,
                })
            })
            .collect()
    }

    #[test]
    fn windows_of_a_document_stay_together() {
        let (train, val) = split_validation(docs(20, 3), 0.25, 7).unwrap();
        let t: BTreeSet<usize> = train.iter().map(|e| e.doc).collect();
        let v: BTreeSet<usize> = val.iter().map(|e| e.doc).collect();
        assert_eq!(v.len(), 5);
        assert!(t.is_disjoint(&v));
        assert_eq!(train.len() + val.len(), 60);
        assert_eq!(val.len(), 15);
    }

    #[test]
    fn fractions_are_checked() {
        assert!(split_validation(docs(3, 1), 1.0, 0).is_err());
        assert!(split_validation(docs(3, 1), -0.1, 0).is_err());
        assert!(split_validation(docs(1, 4), 0.5, 0).is_err());
        let (t, v) = split_validation(docs(3, 1), 0.0, 0).unwrap();
        assert_eq!((t.len(), v.len()), (3, 0));
        let (t, v) = split_validation(docs(3, 1), 0.01, 0).unwrap();
        assert_eq!((t.len(), v.len()), (2, 1));
    }
}
