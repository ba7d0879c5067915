//! The `pgstream-host` command line.

fn main() {
    println!("pgstream-host {}", env!("CARGO_PKG_VERSION"));
}
