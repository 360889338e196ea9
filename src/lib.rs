//! fdtserver: a pre-forking multi-process TCP server daemon with reloadable app plugins.
//!
//! The binary (`src/main.rs`) is a thin shell over [`cli::main`]. See ARCHITECTURE.md for the
//! processes, the signals, the reload sequence and a map of these modules.

pub mod app_timers;
pub mod balance;
pub mod bus;
pub mod cli;
pub mod config;
pub mod control;
pub mod ipc;
pub mod listener;
pub mod logging;
pub mod master;
pub mod plugin;
pub mod preflight;
pub mod privileges;
pub mod proxy_protocol;
pub mod sys;
pub mod txn;
pub mod worker;
