// jemalloc: the hot path allocates many small, short-lived buffers (requests, records, JSON),
// most of them freed on another thread than the one that made them (an HTTP worker builds an
// event, the writer drops it). Measured in `courier bench` against the system allocator and
// mimalloc: faster ingest and delivery, and less memory under a large backlog (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    courier::cli::main()
}
