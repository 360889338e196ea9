//! The `fdtserver` command; everything happens in the library.

fn main() {
    std::process::exit(fdtserver::cli::main());
}
