//! Integration tests: layering.
