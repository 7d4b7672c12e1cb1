//! `meshctl`: the operator's CLI; see [`mesh_agent::cli`].

fn main() {
    std::process::exit(mesh_agent::cli::main());
}
