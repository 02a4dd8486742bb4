//! What a compile targets: the host CPU (`kernels.so`), NVIDIA sm_90a (`kernels.ptx`), or both.
//! Passes read it from their options (a pass that chooses by target must not guess it), and the
//! packer from its own.

use crate::codegen::gpu;

/// Which targets to compile for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Targets {
    Cpu,
    Gpu,
    All,
}

impl Targets {
    /// Parses the CLI spelling: `cpu`, `sm_90a` or `all`.
    pub fn parse(text: &str) -> Option<Targets> {
        match text {
            "cpu" => Some(Targets::Cpu),
            _ if text == gpu::SM => Some(Targets::Gpu),
            "all" => Some(Targets::All),
            _ => None,
        }
    }

    pub fn cpu(self) -> bool {
        matches!(self, Targets::Cpu | Targets::All)
    }

    pub fn gpu(self) -> bool {
        matches!(self, Targets::Gpu | Targets::All)
    }
}
