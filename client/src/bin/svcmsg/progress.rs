//! Transfer progress on stderr: an indicatif bar (bytes, rate, ETA) on a terminal, else one
//! plain line per 10 %.

use std::{
    io::IsTerminal,
    sync::Mutex,
    time::{Duration, Instant},
};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct TransferProgress {
    label: &'static str,
    display: Display,
}

enum Display {
    Bar(ProgressBar),
    Lines(Mutex<Lines>),
}

struct Lines {
    started: Instant,
    /// The last tenth printed (a resumed transfer goes back and does not print it again).
    printed_tenths: u64,
}

impl TransferProgress {
    pub fn new(label: &'static str) -> Self {
        let display = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label);
            bar.enable_steady_tick(Duration::from_millis(200));
            Display::Bar(bar)
        } else {
            Display::Lines(Mutex::new(Lines {
                started: Instant::now(),
                printed_tenths: 0,
            }))
        };
        TransferProgress { label, display }
    }

    pub fn update(&self, position: u64, total: u64) {
        match &self.display {
            Display::Bar(bar) => {
                bar.set_length(total);
                bar.set_position(position);
            }
            Display::Lines(lines) => {
                let mut lines = lines
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                // An empty file is done at once.
                let tenths = position.saturating_mul(10).checked_div(total).unwrap_or(10);
                while lines.printed_tenths < tenths.min(10) {
                    lines.printed_tenths += 1;
                    let elapsed = lines.started.elapsed().as_secs_f64().max(1e-3);
                    eprintln!(
                        "{}: {:>3}% ({} of {}, {}/s)",
                        self.label,
                        lines.printed_tenths * 10,
                        HumanBytes(position),
                        HumanBytes(total),
                        HumanBytes((position as f64 / elapsed) as u64),
                    );
                }
            }
        }
    }

    /// Leaves the completed bar on screen.
    pub fn finish(&self) {
        if let Display::Bar(bar) = &self.display {
            bar.finish();
            // indicatif leaves the cursor after the bar: what comes next starts a line of its own.
            eprintln!();
        }
    }

    /// Stops drawing where the transfer stopped.
    pub fn abandon(&self) {
        if let Display::Bar(bar) = &self.display {
            bar.abandon();
            eprintln!();
        }
    }
}
