//! Makes cargo rebuild the binary when what `src/scaffold.rs` embeds with `include_dir!`
//! changes: the macro cannot tell cargo which files it read.

fn main() {
    println!("cargo::rerun-if-changed=../templates");
    println!("cargo::rerun-if-changed=../guest-sdk/src");
}
