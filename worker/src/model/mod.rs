//! The seed's networks, each a struct implementing `nn::ModuleT`, built from an `nn::Path`.

pub mod classifier;
pub mod dae;
pub mod wgan;
