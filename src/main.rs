//! The `sluice` binary: see `sluice --help`.

/// mimalloc (version 3) keeps freed pages for a second before returning them to the OS, so a
/// sync that frees and reallocates large Arrow buffers reuses them instead of faulting in fresh
/// zeroed pages; `MIMALLOC_PURGE_DELAY` (milliseconds) tunes that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    no_huge_pages();
    sluice::cli::main()
}

/// Turns transparent huge pages off for the process, as `MIMALLOC_ALLOW_THP=0` does (unless that
/// variable says otherwise). mimalloc asks for them, and each is a 2 MB page zeroed (after a
/// compaction, when memory is fragmented) on first touch. A sync streams through its memory
/// rather than revisiting it, so it pays that without the TLB savings paying it back: the 1M-row
/// first load into Postgres used 0.5 CPU-s instead of 0.8–1.2 and ended 10–30% sooner, while
/// the 10M-row diff bench ran within its noise either way (`cargo bench --bench postgres`, `--bench diff`).
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: prctl(PR_SET_THP_DISABLE) takes plain integers and only sets a process flag.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
}
