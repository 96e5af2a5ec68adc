fn main() -> std::process::ExitCode {
    courier::cli::main()
}
