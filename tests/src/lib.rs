//! nc-tests: end-to-end tests live in tests/; this library holds shared fixtures helpers.
