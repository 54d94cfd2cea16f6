//! The eBPF build needs `bpf-linker` on PATH; rebuild when it changes.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => {
            panic!("bpf-linker not found on PATH ({err}); run `cargo xtask setup` (or see README.md) to install it")
        }
    }
}
