// mimalloc: the hot path allocates many small, short-lived buffers (requests, records, JSON);
// measured faster than the system allocator in `courier bench` (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    courier::cli::main()
}
