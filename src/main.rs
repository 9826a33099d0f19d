//! The `sluice` binary: see `sluice --help`.

/// mimalloc (version 3) keeps freed pages for a second before returning them to the OS, so a
/// sync that frees and reallocates large Arrow buffers reuses them instead of faulting in fresh
/// zeroed pages; `MIMALLOC_PURGE_DELAY` (milliseconds) tunes that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sluice::cli::main()
}
