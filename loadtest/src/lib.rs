//! sockbus-loadtest: drives sockbus and NATS the same way and reports what
//! they deliver, how fast, at what latency and for how much CPU.
//!
//! - `driver/`: the one trait both brokers' clients implement;
//! - `scenario/`: what is sent and measured (pubsub, fanout, queue, reqrep,
//!   latency), generic over the driver;
//! - `stats`, `cpu`: the arithmetic and the clocks behind the numbers;
//! - `report`, `chart`, `progress`: tables, JSON, SVG, the progress bar;
//! - `commands/`: one file per subcommand; `servers` starts and always
//!   stops the brokers `compare` runs against.

pub mod chart;
pub mod commands;
pub mod cpu;
pub mod driver;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod servers;
pub mod stats;
pub mod tls;

pub use driver::Target;
pub use scenario::{run, Length, Outcome, RunCtx, Scenario, Spec};
