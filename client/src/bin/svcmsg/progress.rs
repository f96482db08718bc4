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
    /// When the transfer (re)started, and from which position: the rate counts only the bytes
    /// moved since.
    started: Instant,
    started_at: u64,
    /// The last tenth printed (a resumed transfer does not print the skipped tenths).
    printed_tenths: u64,
    /// The previous position; `None` before the first report.
    last: Option<u64>,
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
                started_at: 0,
                printed_tenths: 0,
                last: None,
            }))
        };
        TransferProgress { label, display }
    }

    /// `position` of `total` bytes moved; a position below the previous one (or a first one
    /// above 0) is a transfer resumed there.
    pub fn update(&self, position: u64, total: u64) {
        match &self.display {
            Display::Bar(bar) => {
                bar.set_length(total);
                let previous = bar.position();
                bar.set_position(position);
                if position < previous || (previous == 0 && position > 0 && position < total) {
                    // The bytes skipped are no rate: estimate from here on.
                    bar.reset_eta();
                }
            }
            Display::Lines(lines) => {
                let mut lines = lines
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                // An empty file is done at once.
                let tenths = position.saturating_mul(10).checked_div(total).unwrap_or(10);
                let resumed = match lines.last {
                    None => position > 0 && position < total,
                    Some(last) => position < last,
                };
                lines.last = Some(position);
                if resumed {
                    lines.started = Instant::now();
                    lines.started_at = position;
                    lines.printed_tenths = lines.printed_tenths.max(tenths);
                    eprintln!(
                        "{}: resuming at {}% ({} of {})",
                        self.label,
                        position
                            .saturating_mul(100)
                            .checked_div(total)
                            .unwrap_or(100),
                        HumanBytes(position),
                        HumanBytes(total),
                    );
                    return;
                }
                while lines.printed_tenths < tenths.min(10) {
                    lines.printed_tenths += 1;
                    let elapsed = lines.started.elapsed().as_secs_f64().max(1e-3);
                    let moved = position.saturating_sub(lines.started_at);
                    eprintln!(
                        "{}: {:>3}% ({} of {}, {}/s)",
                        self.label,
                        lines.printed_tenths * 10,
                        HumanBytes(position),
                        HumanBytes(total),
                        HumanBytes((moved as f64 / elapsed) as u64),
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
