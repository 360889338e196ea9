//! App plugins: the worker side of the ABI wall ([`loader`]) and the master's pinned copies of
//! plugin files ([`pin`]).
//!
//! Invariant: only worker processes (and the throw-away `check` child) call [`loader`]; the
//! master only copies files.

pub mod loader;
pub mod pin;

pub use loader::{App, Call, ConnHandle, DataOutcome, EventCallback, PushOutcome, StartContext, TimerCallback};
