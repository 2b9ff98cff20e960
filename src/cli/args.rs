//! What several commands take, declared once: the flag groups (where the work runs, how a run
//! is seeded and shown), the choices of the enum flags (each a `ValueEnum`, so `--help` lists
//! the allowed values) and counts that must be at least 1.

use clap::ValueEnum;
use clap::builder::{PossibleValue, TypedValueParser};
use clap::error::ErrorKind;
use std::ffi::OsStr;
use std::fmt::Display;
use std::marker::PhantomData;
use std::str::FromStr;
use vqx::Metric;
use vqx::backend::Device;
use vqx::model::Activation;
use vqx::nearest::Precision;
use vqx::nearest::cpu::CpuKernel;
use vqx::quantizer::{CodebookLearning, Init};

/// `--device`, for a command that has no other backend flag.
#[derive(Debug, clap::Args)]
pub struct OnDevice {
    /// Backend.
    #[arg(long, default_value = "auto", value_parser = choice::<DeviceChoice>())]
    device: DeviceChoice,
}

impl OnDevice {
    pub fn device(&self) -> Device {
        self.device.into()
    }
}

/// `--device` and `--metric`.
#[derive(Debug, clap::Args)]
pub struct Backend {
    #[command(flatten)]
    on: OnDevice,
    /// Distance.
    #[arg(long, default_value = "l2", value_parser = choice::<MetricChoice>())]
    metric: MetricChoice,
}

impl Backend {
    pub fn device(&self) -> Device {
        self.on.device()
    }
    pub fn metric(&self) -> Metric {
        self.metric.into()
    }
}

/// `--device`, `--metric` and `--precision`: the commands that score rows against a codebook.
#[derive(Debug, clap::Args)]
pub struct Scoring {
    #[command(flatten)]
    backend: Backend,
    /// Arithmetic of the nearest-code scores. Every precision returns the exact indices: rows
    /// whose margin is inside the precision's rounding bound are recomputed exactly. Default
    /// exact, until a GPU run shows a re-checked tensor-core path is faster (docs/gpu.md).
    #[arg(long, default_value = "exact", value_parser = choice::<PrecisionChoice>())]
    precision: PrecisionChoice,
}

impl Scoring {
    pub fn device(&self) -> Device {
        self.backend.device()
    }
    pub fn metric(&self) -> Metric {
        self.backend.metric()
    }
    pub fn precision(&self) -> Precision {
        self.precision.into()
    }
}

/// `--seed`, `--deterministic` and `--quiet`: the commands that train.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Seed of every random draw (weights, data, batches, the shuffle, codebook init and
    /// dead-code re-seeding).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sum EMA statistics in a fixed order on CUDA too (the CPU always does).
    #[arg(long)]
    pub deterministic: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// A count of at least 1 (`--batch-size`, `--chunk-rows`, …), as a `value_parser`: clap
/// refuses 0 naming the flag ("invalid value '0' for '--batch-size <N>': must be at least 1").
pub fn count<T>(s: &str) -> Result<T, String>
where
    T: FromStr + PartialOrd + From<u8>,
    T::Err: Display,
{
    let v: T = s.parse().map_err(|e| format!("not a whole number: {e}"))?;
    if v < T::from(1) {
        return Err("must be at least 1".into());
    }
    Ok(v)
}

/// The value parser of every choice below (`value_parser = choice::<E>()`: clap's default
/// for a `ValueEnum` is case-sensitive and would not name the allowed values this way): the
/// value's name or an alias, in any case; a wrong value is refused with the allowed ones
/// ("invalid value 'tpu' for '--device <DEVICE>': expected auto, cpu, cuda or cuda-emu").
pub fn choice<E: ValueEnum + Clone + Send + Sync + 'static>() -> Choice<E> {
    Choice(PhantomData)
}

/// See [`choice`].
#[derive(Clone)]
pub struct Choice<E>(PhantomData<E>);

impl<E: ValueEnum + Clone + Send + Sync + 'static> TypedValueParser for Choice<E> {
    type Value = E;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<E, clap::Error> {
        let text = value.to_string_lossy();
        E::from_str(&text, true).map_err(|_| {
            let names: Vec<String> = E::value_variants()
                .iter()
                .filter_map(ValueEnum::to_possible_value)
                .map(|p| p.get_name().to_string())
                .collect();
            let expected = match names.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
                _ => names.concat(),
            };
            let flag = arg.map_or_else(|| "the value".to_string(), ToString::to_string);
            clap::Error::raw(
                ErrorKind::InvalidValue,
                format!("invalid value '{text}' for '{flag}': expected {expected}\n"),
            )
            .with_cmd(cmd)
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            E::value_variants()
                .iter()
                .filter_map(ValueEnum::to_possible_value),
        ))
    }
}

/// Declares a `ValueEnum` (to be parsed by [`choice`]); with `=> Type`, a mirror of that
/// library enum with its one conversion to it.
macro_rules! choice {
    ($(#[$doc:meta])* $name:ident => $lib:ty {
        $($(#[$vdoc:meta])* $variant:ident => $value:expr),+ $(,)?
    }) => {
        choice! { $(#[$doc])* $name { $($(#[$vdoc])* $variant),+ } }

        impl From<$name> for $lib {
            fn from(c: $name) -> $lib {
                match c {
                    $($name::$variant => $value),+
                }
            }
        }
    };
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }
    };
}

choice! {
    /// `--device`.
    DeviceChoice => Device {
        /// CUDA when libcuda, a GPU and the kernels are all present; the CPU otherwise.
        Auto => Device::Auto,
        /// The CPU backend.
        Cpu => Device::Cpu,
        /// The GPU; an error saying why when CUDA cannot run.
        #[value(alias = "gpu")]
        Cuda => Device::Cuda,
        /// The CUDA kernels on an emulated device on the CPU: slow, for checking.
        #[value(alias = "cuda_emu")]
        CudaEmu => Device::CudaEmu,
    }
}

choice! {
    /// `--metric`.
    MetricChoice => Metric {
        /// Squared Euclidean distance.
        #[value(alias = "euclidean")]
        L2 => Metric::L2,
        /// Cosine similarity of L2-normalised rows (distance reported as 1 − cos).
        #[value(alias = "cos")]
        Cosine => Metric::Cosine,
    }
}

choice! {
    /// `--precision`.
    PrecisionChoice => Precision {
        /// f32 scores.
        #[value(aliases = ["f32", "fp32"])]
        Exact => Precision::Exact,
        /// tf32 operands on tensor cores (CUDA only; refused on the CPU).
        Tf32 => Precision::Tf32,
        /// bf16 operands on tensor cores (CUDA only; refused on the CPU).
        #[value(alias = "bfloat16")]
        Bf16 => Precision::Bf16,
    }
}

choice! {
    /// `--cpu-kernel`.
    CpuKernelChoice => CpuKernel {
        /// AVX-512 where the CPU has it, portable otherwise.
        Auto => CpuKernel::Auto,
        /// The fused AVX-512F kernel.
        #[value(alias = "avx-512")]
        Avx512 => CpuKernel::Avx512,
        /// GEMM tiles (AVX2/FMA or scalar) and a scan.
        Portable => CpuKernel::Portable,
    }
}

choice! {
    /// `--activation`.
    ActivationChoice => Activation {
        /// GELU (tanh form).
        Gelu => Activation::Gelu,
        /// max(x, 0).
        Relu => Activation::Relu,
    }
}

choice! {
    /// `--codebook` of `vqx train`: how the codebook learns.
    LearningChoice {
        /// Exponential moving averages of the assigned rows (decay --ema-decay).
        Ema,
        /// AdamW on the codebook loss.
        #[value(alias = "grad")]
        Gradient,
    }
}

impl LearningChoice {
    /// The library's rule; `decay` is the EMA decay.
    pub fn learning(self, decay: f32) -> CodebookLearning {
        match self {
            LearningChoice::Ema => CodebookLearning::ema(decay),
            LearningChoice::Gradient => CodebookLearning::Gradient,
        }
    }
}

choice! {
    /// `--init`: how the codebook starts.
    InitChoice {
        /// K random rows of the first batch.
        Data,
        /// Lloyd's k-means on the first batch.
        #[value(name = "kmeans")]
        KMeans,
    }
}

impl InitChoice {
    /// The library's init; `kmeans_iters` Lloyd iterations for k-means.
    pub fn init(self, kmeans_iters: usize) -> Init {
        match self {
            InitChoice::Data => Init::Data,
            InitChoice::KMeans => Init::KMeans {
                iters: kmeans_iters,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_refuse_zero_and_non_numbers() {
        assert_eq!(count::<usize>("3"), Ok(3));
        assert_eq!(count::<u64>("0"), Err("must be at least 1".into()));
        assert!(
            count::<usize>("-1")
                .unwrap_err()
                .starts_with("not a whole number")
        );
    }

    #[test]
    fn choices_take_aliases_in_any_case_and_convert_once() {
        assert_eq!(
            Device::from(DeviceChoice::from_str("GPU", true).unwrap()),
            Device::Cuda
        );
        assert_eq!(
            Precision::from(PrecisionChoice::from_str("bfloat16", true).unwrap()),
            Precision::Bf16
        );
        assert_eq!(InitChoice::KMeans.init(7), Init::KMeans { iters: 7 });
    }
}
