//! The `longshore` binary: everything lives in the library; this only reports the outcome.

use std::process::ExitCode;

fn main() -> ExitCode {
    match longshore::cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(longshore::cli::exit_code_for(&e))
        }
    }
}
