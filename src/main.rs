//! The `sluice` binary: see `sluice --help`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // mimalloc returns freed pages to the OS after 10 ms by default; a sync frees and reallocates
    // large Arrow buffers constantly, and re-faulting them cost more CPU than the sync itself.
    // Options are read when first used, after this point; an explicit setting wins.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("MIMALLOC_PURGE_DELAY", "1000") };
    }
    sluice::cli::main()
}
