//! Test backend (placeholder).
