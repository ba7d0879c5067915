//! Test support: filled in by the harness work.
