//! `meshctl`: the operator's CLI; see the `meshctl` library.

fn main() {
    std::process::exit(meshctl::main());
}
