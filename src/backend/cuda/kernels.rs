//! The kernel modules and kernels of `kernels/*.cu`, their PTX and their launch constants, as
//! build.rs found them: the one list the real and the emulated device both load from.

/// A kernel, by its position in [`KERNELS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelId(pub(crate) usize);

impl KernelId {
    /// The kernel's name (its `extern "C"` symbol), e.g. "nearest_f32".
    pub fn name(self) -> &'static str {
        KERNELS[self.0].0
    }

    /// The module (kernels/*.cu file stem) that defines it.
    pub fn module(self) -> &'static str {
        MODULES[KERNELS[self.0].1]
    }

    /// Every kernel, in [`KERNELS`] order.
    pub fn all() -> impl Iterator<Item = KernelId> {
        (0..KERNELS.len()).map(KernelId)
    }
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_listed_once_with_its_module() {
        assert_eq!(NEAREST_F32.name(), "nearest_f32");
        assert_eq!(NEAREST_BF16.module(), "nearest_tc");
        assert_eq!(USAGE_U32.module(), "usage");
        let names: std::collections::BTreeSet<_> = KernelId::all().map(|k| k.name()).collect();
        assert_eq!(names.len(), KERNELS.len());
    }
}
