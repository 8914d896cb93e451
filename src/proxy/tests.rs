//! Request path tests.
