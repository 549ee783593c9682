//! Shoal's node runtime (in progress).
