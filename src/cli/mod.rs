//! Command-line front ends.

pub mod image;
