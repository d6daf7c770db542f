//! Process-level service concerns: stop signals. Handlers only set a flag; a second signal
//! ends the process at once.

use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::flag;

/// Exit status when a second stop signal cuts the drain short.
pub const EXIT_INTERRUPTED: i32 = 130;

/// A flag that SIGINT or SIGTERM sets. The first signal asks the pipeline to drain and stop;
/// a second one, while the flag is already set, exits immediately.
pub fn stop_flag() -> io::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // Order matters: the conditional exit sees the flag as the first signal left it.
        flag::register_conditional_shutdown(sig, EXIT_INTERRUPTED, Arc::clone(&stop))?;
        flag::register(sig, Arc::clone(&stop))?;
    }
    Ok(stop)
}
