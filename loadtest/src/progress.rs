//! A progress bar for long runs, drawn only when stderr is a terminal so
//! logs and CI output stay clean.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// A bar over `total_ms` of run time; hidden unless `want` and stderr is a TTY.
    pub fn new(want: bool, label: &str, total: Duration) -> Progress {
        if !want || !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let pb = ProgressBar::with_draw_target(
            Some(total.as_millis() as u64),
            ProgressDrawTarget::stderr_with_hz(10),
        );
        let style = ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed:>3} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        pb.set_style(style);
        pb.set_prefix(label.to_string());
        Progress(Some(pb))
    }

    pub fn hidden() -> Progress {
        Progress(None)
    }

    pub fn set_elapsed(&self, elapsed: Duration) {
        if let Some(pb) = &self.0 {
            pb.set_position(elapsed.as_millis() as u64);
        }
    }

    pub fn message(&self, msg: String) {
        if let Some(pb) = &self.0 {
            pb.set_message(msg);
        }
    }

    pub fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    /// Clears the line also when a run fails half-way.
    fn drop(&mut self) {
        self.finish();
    }
}
