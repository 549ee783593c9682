//! Shoal's node runtime (in progress).

pub mod linearizability;
