//! Masking token ids for masked-token training (SPEC §6): per sequence draw r from a schedule and
//! replace each eligible token by MASK with probability r, i.i.d.
//!
//! Eligible means: not padding, not one of the protected ids (BOS/EOS: ESM3 never samples them),
//! and not already MASK. With track dropout p, a sequence's whole track is masked (r = 1) with
//! probability p, as ESM3 does per track.
//!
//! Runs on the CPU, in parallel over sequences (rayon). There is no CUDA path: tokens never live
//! on the GPU in this crate yet (the CUDA backend takes host slices and has no device-resident
//! token API), so a kernel would only add two copies around work that costs about one random draw
//! per token.
//!
//! Every sequence has its own generator keyed by (seed, sequence index), so the result depends on
//! the seed only, not on the number of threads or on how rayon splits the batch.

use super::{NoiseSchedule, Schedule, check_rate};
use crate::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rayon::prelude::*;

/// ESM3 structure-token MASK id (SPEC §7).
pub const ESM3_STRUCTURE_MASK: u32 = 4096;
/// ESM3 structure-token EOS id.
pub const ESM3_STRUCTURE_EOS: u32 = 4097;
/// ESM3 structure-token BOS id.
pub const ESM3_STRUCTURE_BOS: u32 = 4098;
/// ESM3 structure-token PAD id.
pub const ESM3_STRUCTURE_PAD: u32 = 4099;
/// ESM3 structure-token CHAINBREAK id.
pub const ESM3_STRUCTURE_CHAINBREAK: u32 = 4100;

/// ESM3's tracks and their training noise (the ESM3 paper's appendix, SPEC §6; not in the released
/// code).
///
/// | track | schedule | track dropout |
/// |---|---|---|
/// | sequence | betalinear30 | 0 |
/// | structure tokens | cosine | 0.25 |
/// | coordinates | cubic | 0.5 |
/// | annotations | square_root | 0.9 |
///
/// ```
/// use vqx::schedule::{Schedule, Track};
/// assert_eq!(Track::Structure.esm3_schedule(), Schedule::Cosine);
/// assert_eq!(Track::Structure.esm3_dropout(), 0.25);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Track {
    /// Amino-acid sequence.
    Sequence,
    /// VQ structure tokens.
    Structure,
    /// Backbone coordinates.
    Coordinates,
    /// Function / residue annotations.
    Annotations,
}

impl Track {
    /// Every track.
    pub const ALL: [Track; 4] = [
        Track::Sequence,
        Track::Structure,
        Track::Coordinates,
        Track::Annotations,
    ];

    /// The schedule ESM3 trains this track with.
    pub fn esm3_schedule(self) -> Schedule {
        match self {
            Track::Sequence => Schedule::BetaLinear30,
            Track::Structure => Schedule::Cosine,
            Track::Coordinates => Schedule::Cubic,
            Track::Annotations => Schedule::SquareRoot,
        }
    }

    /// The probability that ESM3 drops (fully masks) this track in a training example.
    pub fn esm3_dropout(self) -> f64 {
        match self {
            Track::Sequence => 0.0,
            Track::Structure => 0.25,
            Track::Coordinates => 0.5,
            Track::Annotations => 0.9,
        }
    }
}

/// What to mask with and what never to mask.
///
/// ```
/// use vqx::schedule::MaskConfig;
/// let cfg = MaskConfig::new(32).with_pad(1).with_protected(&[0, 2]).with_track_dropout(0.1);
/// assert_eq!((cfg.mask_id, cfg.pad_id, cfg.track_dropout), (32, Some(1), 0.1));
/// let esm3 = MaskConfig::esm3_structure();
/// assert_eq!((esm3.mask_id, esm3.pad_id), (4096, Some(4099)));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MaskConfig {
    /// The id written at masked positions.
    pub mask_id: u32,
    /// Padding id: never masked, left as is.
    pub pad_id: Option<u32>,
    /// Ids never masked (BOS, EOS, ...).
    pub protected_ids: Vec<u32>,
    /// Probability that a sequence's whole track is masked (r = 1), in [0, 1].
    pub track_dropout: f64,
}

impl MaskConfig {
    /// Mask with `mask_id`; no padding, nothing protected, no track dropout.
    pub fn new(mask_id: u32) -> Self {
        MaskConfig {
            mask_id,
            pad_id: None,
            protected_ids: Vec::new(),
            track_dropout: 0.0,
        }
    }

    /// ESM3 structure tokens: MASK 4096, PAD 4099, BOS 4098 and EOS 4097 protected, track
    /// dropout 0.25. CHAINBREAK (4100) is left maskable, as SPEC §6 names only BOS/EOS; add it
    /// with [`with_protected`](Self::with_protected) to keep it.
    pub fn esm3_structure() -> Self {
        MaskConfig::new(ESM3_STRUCTURE_MASK)
            .with_pad(ESM3_STRUCTURE_PAD)
            .with_protected(&[ESM3_STRUCTURE_BOS, ESM3_STRUCTURE_EOS])
            .with_track_dropout(Track::Structure.esm3_dropout())
    }

    /// Sets the padding id.
    pub fn with_pad(mut self, pad_id: u32) -> Self {
        self.pad_id = Some(pad_id);
        self
    }

    /// Adds ids that are never masked.
    pub fn with_protected(mut self, ids: &[u32]) -> Self {
        self.protected_ids.extend_from_slice(ids);
        self
    }

    /// Sets the track-dropout probability.
    pub fn with_track_dropout(mut self, p: f64) -> Self {
        self.track_dropout = p;
        self
    }

    fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.track_dropout) {
            return Err(Error::InvalidArgument(format!(
                "track dropout {} is not a probability in [0, 1]",
                self.track_dropout
            )));
        }
        if self.pad_id == Some(self.mask_id) || self.protected_ids.contains(&self.mask_id) {
            return Err(Error::InvalidArgument(format!(
                "mask id {} is also the padding or a protected id",
                self.mask_id
            )));
        }
        Ok(())
    }

    fn eligible(&self, id: u32) -> bool {
        id != self.mask_id && Some(id) != self.pad_id && !self.protected_ids.contains(&id)
    }
}

/// The result of [`mask_tokens`]: same layout as the input (B sequences of L ids, row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Masked {
    /// The ids with masked positions replaced by the MASK id.
    pub ids: Vec<u32>,
    /// True where this call masked the position (the positions the loss is averaged over).
    pub mask: Vec<bool>,
    /// The rate each sequence was masked with: the schedule's draw, or 1 when dropped.
    pub rates: Vec<f64>,
    /// Whether each sequence's track was dropped (fully masked).
    pub dropped: Vec<bool>,
}

impl Masked {
    /// Number of masked positions.
    pub fn masked_count(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }
}

/// The generator of sequence `index` for `seed`: a distinct ChaCha key per (seed, index), so
/// sequences get independent streams whatever the thread split.
fn sequence_rng(seed: u64, index: u64) -> StdRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&index.to_le_bytes());
    StdRng::from_seed(key)
}

/// Masks `tokens`, B sequences of `seq_len` ids laid out row-major: for each sequence, with
/// probability `config.track_dropout` masks every eligible position, otherwise draws r from
/// `schedule` and masks each eligible position with probability r. Reproducible for a `seed`.
///
/// Errors: `seq_len` of 0 or not dividing the number of tokens, no tokens, a track dropout
/// outside [0, 1], a mask id that is also padding or protected, or a schedule drawing r outside
/// [0, 1].
///
/// ```
/// use vqx::schedule::{mask_tokens, MaskConfig, Schedule};
/// // Two sequences of 6: BOS=0, EOS=2, PAD=1, MASK=32.
/// let tokens = [0, 5, 6, 7, 2, 1,   0, 9, 9, 2, 1, 1];
/// let cfg = MaskConfig::new(32).with_pad(1).with_protected(&[0, 2]);
/// let m = mask_tokens(&tokens, 6, &Schedule::Cosine, &cfg, 3)?;
/// for (i, &t) in tokens.iter().enumerate() {
///     if [0, 1, 2].contains(&t) { assert!(!m.mask[i] && m.ids[i] == t); }
///     assert_eq!(m.ids[i] == 32, m.mask[i]);
/// }
/// assert_eq!(m.rates.len(), 2);
/// # Ok::<(), vqx::Error>(())
/// ```
pub fn mask_tokens(
    tokens: &[u32],
    seq_len: usize,
    schedule: &dyn NoiseSchedule,
    config: &MaskConfig,
    seed: u64,
) -> Result<Masked> {
    if seq_len == 0 {
        return Err(Error::InvalidArgument("sequence length is 0".into()));
    }
    if tokens.is_empty() {
        return Err(Error::Empty {
            what: "tokens".into(),
            detail: "no sequences to mask".into(),
        });
    }
    if !tokens.len().is_multiple_of(seq_len) {
        return Err(Error::shape(
            "tokens",
            format!("a multiple of the sequence length {seq_len}"),
            format!("{} ids", tokens.len()),
        ));
    }
    config.validate()?;

    let mut ids = tokens.to_vec();
    let mut mask = vec![false; tokens.len()];
    // Batches of short sequences: hand rayon a few thousand tokens per task, not one sequence.
    let min_seqs = (4096 / seq_len).max(1);
    let per_seq: Vec<Result<(f64, bool)>> = ids
        .par_chunks_mut(seq_len)
        .zip(mask.par_chunks_mut(seq_len))
        .enumerate()
        .with_min_len(min_seqs)
        .map(|(i, (ids, mask))| {
            let mut rng = sequence_rng(seed, i as u64);
            // Both draws are always made, so a sequence's token draws do not depend on p.
            let dropped = rng.r#gen::<f64>() < config.track_dropout;
            let drawn = check_rate(schedule, schedule.sample(&mut rng))?;
            let r = if dropped { 1.0 } else { drawn };
            // One u32 per token against r·2^32 (half the generator output of an f64 draw):
            // r = 1 masks every eligible position, r = 0 none, other rates to within 2^-32.
            let threshold = (r * 4_294_967_296.0) as u64;
            for (id, m) in ids.iter_mut().zip(mask.iter_mut()) {
                if config.eligible(*id) && u64::from(rng.next_u32()) < threshold {
                    *id = config.mask_id;
                    *m = true;
                }
            }
            Ok((r, dropped))
        })
        .collect();

    let mut rates = Vec::with_capacity(per_seq.len());
    let mut dropped = Vec::with_capacity(per_seq.len());
    for s in per_seq {
        let (r, d) = s?;
        rates.push(r);
        dropped.push(d);
    }
    Ok(Masked {
        ids,
        mask,
        rates,
        dropped,
    })
}
