//! Lets the `shale` binary find the prebuilt libduckdb at run time: an rpath to the folder it
//! was linked from (DUCKDB_LIB_DIR), and to the binary's own folder for installed copies.

fn main() {
    println!("cargo:rerun-if-env-changed=DUCKDB_LIB_DIR");
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN");
    if let Ok(dir) = std::env::var("DUCKDB_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
